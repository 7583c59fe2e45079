"""The fused Triton ``rg_coupling_layer``: one whole RNVP coupling layer (both checkerboard
steps, the ``S`` and ``T`` nets, coupling and log-det) as a differentiable ``torch.library``
custom op on the kernels of :mod:`rgflow_fast.kernels.rg_coupling_layer`.

    rgflow_fast_triton::coupling_layer(u, w_in, w_mid, w_out, vec, sig, k, n_res, n_mlp,
        hidden, inverse, store, precision) -> (u', rows (2, N), u_mid, saved_0, saved_1)
    rgflow_fast_triton::coupling_layer_backward(...) -> (g_u, g_w_in, g_w_mid, g_w_out, g_vec, g_sig)

The op works on *packed* parameters: :func:`pack_params` applies the weight norm
``W = g ⊙ V / ‖V‖_row`` once per call and zero-pads every tensor to the kernels' tile widths
with differentiable torch ops, so autograd carries the packed gradients back to ``β, V, g, b,
σ``. The per-image log-det is the per-row buffer summed per image, step by step, as the
reference sums it.

Precision (``precision=``): ``"fp32"`` exact fp32 products (``ieee``); ``"tf32"`` TF32
operands; ``"bf16"`` bf16 operands (weights and activations), fp32 accumulation and fp32
arithmetic elsewhere, and the activations saved for the backward (and the output gradients
the weight GEMM reads) kept in bf16. Tolerances against the float64 reference (max-abs error
relative to the max-abs of ``u'``, of the layer's log-det contribution ``ldj' - ldj``, and of
each gradient), held by ``tests/test_rg_coupling_layer_triton.py``:

    =========  =======  ========  =========
    precision  u'       log-det   gradients
    =========  =======  ========  =========
    fp32       1e-5     1e-4      1e-4
    tf32       1.25e-3  7.5e-3    1.25e-2
    bf16       5e-3     3e-2      5e-2
    =========  =======  ========  =========

bf16's bounds are two to five times the worst error of an fp32 emulation of its rounding at
the paper config (u' 1e-3, log-det 7e-3, gradients 2.1e-2, operands and saved tensors rounded;
tested on the CPU); TF32, with 8× bf16's precision and fp32 storage, gets a quarter. The GPU
tests hold the kernels themselves to the table.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .coupling_layer import check_layer_inputs, net_layout, reference_layer

try:
    from .kernels import rg_coupling_layer as _k

    _IMPORT_ERROR = None
except ImportError as exc:  # no triton, or one too old for the kernels
    _k = None
    _IMPORT_ERROR = exc

__all__ = ["rg_coupling_layer", "unsupported_reason", "backend_rg_coupling_layer", "pack_params",
           "PRECISIONS"]

PRECISIONS = ("fp32", "tf32", "bf16")
_INT32_MAX = 2**31 - 1


def _hidden(params, n_res):
    """Hidden width of the nets (1 when they have no residual block)."""
    return params[1].shape[0] if n_res else 1


def unsupported_reason(u: Tensor, params, n_mlp: int, precision: str = "fp32"):
    """Why the fused kernels cannot run this layer (None if they can); the caller then runs
    :func:`rgflow_fast.coupling_layer.reference_layer`."""
    if precision not in PRECISIONS:
        return f"precision must be one of {PRECISIONS}; got {precision!r}"
    if _k is None:
        return f"Triton is not importable ({_IMPORT_ERROR}); pip install 'triton>=3.3'"
    D = u.shape[1] * u.shape[2] * u.shape[3]
    if D > _k.MAX_D:
        return (f"the fused layer holds all D = C·k² = {D} features of a row in registers and "
                f"serves D ≤ {_k.MAX_D}; use a smaller kernel_size or fewer channels per block")
    if u.device.type == "cuda":
        if u.dtype != torch.float32:
            return (f"the fused layer runs float32 tensors on the GPU (got {u.dtype}); keep the "
                    f"model in float32 and pick precision='bf16' or 'tf32' for faster products")
        if precision != "fp32" and torch.cuda.get_device_capability(u.device) < (8, 0):
            return f"precision={precision!r} needs tensor cores of compute capability ≥ 8.0"
    elif u.device.type == "cpu":
        if not _k.INTERPRETED:
            return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 "
                    "before Triton is first imported (slow; for tests), or move to a GPU")
        if u.dtype not in (torch.float32, torch.float64):
            return f"the Triton interpreter runs float32 and float64 only (got {u.dtype})"
        if precision != "fp32":
            return (f"precision={precision!r} needs a GPU (the interpreter computes products "
                    f"exactly and rounds bf16 by truncation); use precision='fp32'")
    else:
        return f"Triton kernels run on CUDA tensors (or CPU ones in its interpreter), not {u.device.type}"
    n_res = net_layout(len(params), n_mlp)
    cfg = _k.tile_config(D, _hidden(params, n_res), u.device, precision)
    if max(_k.saved_sizes(cfg, n_res, n_mlp, u.shape[0])) > _INT32_MAX:
        return (f"{u.shape[0]} rows is too many for one call (the saved activations would pass "
                f"2^31 elements); split the batch")
    return None


def pack_params(params, n_res: int, n_mlp: int, D: int, cfg):
    """Weight-normalise and pack the flat parameter list (both nets) into the kernels' layout.

    Returns ``(w_in (2R, HP, DP), w_mid (2R·(n_mlp-1), HP, HP), w_out (2R, DP, HP),
    vec (2, R, n_mlp+1, 2, VW), sig (2, DP))``: ``W_i`` zero-padded, ``vec[..., i, 0]`` = ``β_i``
    and ``vec[..., i, 1]`` = ``b_i`` zero-padded to ``VW``; ``sig`` the ``σ`` of ``S`` then ``T``.
    Padding with zeros keeps padded features at exactly 0 through every layer (``swish(0) = 0``).
    An empty group is a one-element placeholder (the kernels never read it)."""
    DP, HP, VW = cfg.DP, cfg.HP, cfg.VW
    half = len(params) // 2
    w_in, w_mid, w_out, vecs, sigs = [], [], [], [], []
    for net in (params[:half], params[half:]):
        it = iter(net)
        for _ in range(n_res):
            for i in range(n_mlp + 1):
                beta, V, g, b = next(it), next(it), next(it), next(it)
                W = V * (g / V.norm(dim=1, keepdim=True))
                rows_to = DP if i == n_mlp else HP
                cols_to = DP if i == 0 else HP
                W = F.pad(W, (0, cols_to - W.shape[1], 0, rows_to - W.shape[0]))
                (w_in if i == 0 else w_out if i == n_mlp else w_mid).append(W)
                vecs += [F.pad(beta, (0, VW - beta.shape[0])), F.pad(b, (0, VW - b.shape[0]))]
        sigma = next(it)
        sigs.append(F.pad(sigma, (0, DP - D)))
    like = params[0]

    def stack(group):
        return torch.stack(group) if group else like.new_zeros(1)

    vec = torch.stack(vecs).view(2, n_res, n_mlp + 1, 2, VW) if vecs else like.new_zeros(1)
    return stack(w_in), stack(w_mid), stack(w_out), vec, torch.stack(sigs)


def _operands(weights, precision):
    """The weights as the kernels' ``tl.dot`` operands (bf16 in ``"bf16"`` mode)."""
    if precision == "bf16":
        return [w.to(torch.bfloat16) for w in weights]
    return list(weights)


def save_dtype(u, precision):
    """dtype of the saved activations and output gradients: bf16 in ``"bf16"`` mode (they are
    bf16 ``tl.dot`` operands there anyway; halves the backward's HBM traffic), else ``u``'s."""
    return torch.bfloat16 if precision == "bf16" else u.dtype


def _steps(inverse):
    return (1, 0) if inverse else (0, 1)


@torch.library.custom_op("rgflow_fast_triton::coupling_layer", mutates_args=())
def _layer(
    u: Tensor, w_in: Tensor, w_mid: Tensor, w_out: Tensor, vec: Tensor, sig: Tensor,
    kernel_size: int, n_res: int, n_mlp: int, hidden: int, inverse: bool, store: bool,
    precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(u', rows (2, N) per step in order, u after the first step, saved activations of each
    step (empty unless ``store``))``."""
    N, D = u.shape[0], u[0].numel()
    cfg = _k.tile_config(D, hidden, u.device, precision)
    ops = _operands((w_in, w_mid, w_out), precision)
    x = u.reshape(N, D).contiguous()
    outs = []
    for parity in _steps(inverse):
        x, rows, hsave = _k.step_forward(x, *ops, vec, sig, cfg, kernel_size, parity, inverse,
                                         n_res, n_mlp, precision, store, save_dtype(u, precision))
        outs.append((x, rows, hsave))
    (mid, rows0, h0), (y, rows1, h1) = outs
    return y.view(u.shape), torch.stack([rows0, rows1]), mid, h0, h1


@_layer.register_fake
def _(u, w_in, w_mid, w_out, vec, sig, kernel_size, n_res, n_mlp, hidden, inverse, store, precision):
    N, D = u.shape[0], u[0].numel()
    cfg = _k.tile_config(D, hidden, u.device, precision)
    saved = sum(_k.saved_sizes(cfg, n_res, n_mlp, N)) if store else 0
    dtype = save_dtype(u, precision)
    return (u.new_empty(u.shape), u.new_empty(2, N), u.new_empty(N, D),
            u.new_empty(saved, dtype=dtype), u.new_empty(saved, dtype=dtype))


@torch.library.custom_op("rgflow_fast_triton::coupling_layer_backward", mutates_args=())
def _layer_backward(
    u: Tensor, mid: Tensor, g_y: Tensor, g_rows: Tensor, w_in: Tensor, w_mid: Tensor,
    w_out: Tensor, vec: Tensor, sig: Tensor, h0: Tensor, h1: Tensor, kernel_size: int,
    n_res: int, n_mlp: int, hidden: int, inverse: bool, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the layer in ``u`` and every packed parameter. Steps run in reverse; an
    empty ``h`` (``recompute``) is rebuilt by re-running that step's forward with ``STORE``."""
    N, D = u.shape[0], u[0].numel()
    cfg = _k.tile_config(D, hidden, u.device, precision)
    ops = _operands((w_in, w_mid, w_out), precision)
    g_w = [torch.zeros_like(w) for w in (w_in, w_mid, w_out)]
    g_beta = u.new_zeros(2, n_res, n_mlp + 1, cfg.VW)
    g_b = u.new_zeros(2, n_res, n_mlp + 1, cfg.VW)
    g_sig = torch.zeros_like(sig)
    g = g_y.reshape(N, D).contiguous()
    inputs = (u.reshape(N, D).contiguous(), mid)
    for step in (1, 0):
        parity = _steps(inverse)[step]
        x, hsave = inputs[step], (h0, h1)[step]
        if hsave.numel() == 0:
            hsave = _k.step_forward(x, *ops, vec, sig, cfg, kernel_size, parity, inverse, n_res,
                                    n_mlp, precision, True, save_dtype(u, precision))[2]
        g, gdsave, ghsave, pvec, psig = _k.step_backward(
            x, g, g_rows[step].contiguous(), hsave, *ops, vec, sig, cfg, kernel_size, parity,
            inverse, n_res, n_mlp, precision,
        )
        g_sig += psig.sum(dim=0)
        if n_res:
            for acc, part in zip(g_w, _k.weight_grads(hsave, gdsave, ghsave, vec, cfg, n_res,
                                                      n_mlp, precision, u.dtype)):
                if part.numel():
                    acc += part
            g_beta += pvec.sum(dim=0)
            # g_b = Σ_rows G (padded rows hold zeros): H wide for linears 0 .. n_mlp-1, D for the last
            g_b[:, :, :n_mlp, : cfg.HP] += ghsave.sum(dim=3, dtype=u.dtype)
            g_b[:, :, n_mlp, : cfg.DP] += gdsave.sum(dim=2, dtype=u.dtype)
        del hsave, gdsave, ghsave
    g_vec = torch.stack([g_beta, g_b], dim=3).reshape(vec.shape) if n_res else torch.zeros_like(vec)
    return (g.view(u.shape), *g_w, g_vec, g_sig)


@_layer_backward.register_fake
def _(u, mid, g_y, g_rows, w_in, w_mid, w_out, vec, sig, h0, h1, kernel_size, n_res, n_mlp,
      hidden, inverse, precision):
    return tuple(x.new_empty(x.shape) for x in (u, w_in, w_mid, w_out, vec, sig))


def _setup(ctx, inputs, output):
    u, w_in, w_mid, w_out, vec, sig, *meta = inputs
    _, _, mid, h0, h1 = output
    ctx.save_for_backward(u, mid, w_in, w_mid, w_out, vec, sig, h0, h1)
    ctx.meta = meta  # kernel_size, n_res, n_mlp, hidden, inverse, store, precision


def _backward(ctx, g_y, g_rows, *_):
    u, mid, w_in, w_mid, w_out, vec, sig, h0, h1 = ctx.saved_tensors
    kernel_size, n_res, n_mlp, hidden, inverse, _store, precision = ctx.meta
    g_y = torch.zeros_like(u) if g_y is None else g_y
    g_rows = u.new_zeros(2, u.shape[0]) if g_rows is None else g_rows
    grads = _layer_backward(u, mid, g_y, g_rows, w_in, w_mid, w_out, vec, sig, h0, h1,
                            kernel_size, n_res, n_mlp, hidden, inverse, precision)
    return (*grads, *([None] * 7))


_layer.register_autograd(_backward, setup_context=_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "the fused Triton rg_coupling_layer is differentiable once; for higher-order gradients "
        "run it under rgflow_fast.use_backend('torch')"
    )


_layer_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def rg_coupling_layer(u, ldj, params, n_mlp, inverse=False, recompute=False, precision="fp32"):
    """The fused layer: :func:`rgflow_fast.coupling_layer.rg_coupling_layer`'s contract
    (``u (N, C, k, k)``, ``ldj (B,)``, flat ``params``; returns ``(u', ldj')``), on the Triton
    kernels, with the products in ``precision`` (module docstring). ``recompute=True`` keeps
    only the layer's inputs for the backward pass. Raises ``ValueError`` with the reason if
    the kernels cannot serve the shape (see :func:`unsupported_reason`)."""
    n_res = check_layer_inputs(u, ldj, params, n_mlp)
    reason = unsupported_reason(u, params, n_mlp, precision)
    if reason is not None:
        raise ValueError(f"the fused Triton layer cannot run this call: {reason}")
    D = u.shape[1] * u.shape[2] * u.shape[3]
    hidden = _hidden(params, n_res)
    cfg = _k.tile_config(D, hidden, u.device, precision)
    packed = pack_params(list(params), n_res, n_mlp, D, cfg)
    # keep activations for a backward pass only when there will be one
    needs_grad = torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in params))
    y, rows, *_ = _layer(u, *packed, u.shape[-1], n_res, n_mlp, hidden, inverse,
                         needs_grad and not recompute, precision)
    B = ldj.shape[0]
    for step in range(2):
        ldj = ldj + rows[step].reshape(B, -1).sum(dim=1)
    return y, ldj


def backend_rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision="fp32"):
    """The Triton backend's ``rg_coupling_layer``: the fused op where it can run, else the
    reference (:func:`rgflow_fast.coupling_layer.reference_layer`)."""
    if unsupported_reason(u, params, n_mlp, precision) is not None:
        return reference_layer(u, ldj, params, n_mlp, inverse, recompute)
    return rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision)
