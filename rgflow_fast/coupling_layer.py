"""The ``rg_coupling_layer`` op family: one whole RNVP coupling layer on the patch tensor.

One call runs both checkerboard steps of a layer (parity 0, then parity 1; the inverse runs
parity 1, then parity 0) with the layer's two conditioner nets ``S`` and ``T``:

    for parity in (0, 1):                       # transformed half m = checkerboard(parity)
        v = (1 - m) ⊙ u                         # the kept half is the nets' input
        s = m ⊙ tanh(σ_s ⊙ R_s(v))      t = m ⊙ (σ_t ⊙ R_t(v))
        u = (1 - m) ⊙ u + m ⊙ (u ⊙ exp(s) + t)  # inverse: (u - t) ⊙ exp(-s)
        ldj[b] += Σ_{p, c, a, bb} s[b·P + p]     # inverse: -=

``R(v)``: for each residual block ``v ← (v + F(v)) / √2``, ``F = Swish(β_0) → Linear_0 → … →
Swish(β_q) → Linear_q`` over widths ``[D, hidden × n_mlp, D]`` (``D = C·k²``, ``q = n_mlp``),
``Swish_β(h) = h · sigmoid(β ⊙ h)``, weight-normalised ``Linear(h) = h Wᵀ + b`` with
``W = g ⊙ V / ‖V‖_row``.

Shapes: ``u (N, C, k, k)`` with ``N = B·P`` (row ``b·P + p`` is patch ``p`` of image ``b``, as
:func:`rgflow_fast.functional.rg_gather` stacks them); ``ldj (B,)`` is the running per-image
log-determinant, returned with this layer's contribution added (step by step, so the
reference keeps the original code's summation order bit for bit).

``params`` is one flat list: the ``S`` net's tensors, then the ``T`` net's, each net as
:meth:`rgflow_fast.nets.ResidualMLP.op_parameters` lists them —

    for r in range(n_res_blocks): for i in range(n_mlp + 1): β (w_i,), V (w_{i+1}, w_i),
                                                              g (w_{i+1}, 1), b (w_{i+1},)
    σ (D,)

so each net holds ``4·n_res_blocks·(n_mlp + 1) + 1`` tensors (``n_res_blocks`` may be 0).
"""
from __future__ import annotations

import torch

from . import backends
from .nets import net_layout
from .reference import rg_coupling_layer as reference_layer

__all__ = [
    "PRECISIONS",
    "rg_coupling_layer",
    "reference_layer",
    "net_layout",
    "check_layer_inputs",
    "register_fake_kernels",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The math of the nets' products in a fused GPU layer: exact float32, TF32 tensor cores,
# bfloat16 operands with float32 accumulation. Backends without such modes compute exactly.
PRECISIONS = ("fp32", "tf32", "bf16")


def _param_shapes(n_res: int, n_mlp: int, D: int, hidden: int) -> list:
    """The shapes of ``params`` (module docstring), both nets, as ``torch.Size`` compares."""
    widths = [D] + [hidden] * n_mlp + [D]
    net = []
    for _ in range(n_res):
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            net += [(w_in,), (w_out, w_in), (w_out, 1), (w_out,)]
    return 2 * (net + [(D,)])


def _raise_for_wrong_param(u, params, expected, D, hidden):
    """Raise for the first parameter whose type, shape, dtype or device is wrong."""
    half = len(expected) // 2
    for i, p in enumerate(params):
        net, j, shape = ("S", i, expected[i]) if i < half else ("T", i - half, expected[i])
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != shape:
            raise ValueError(
                f"{net} net parameter {j} must have shape {shape} (D = C·k² = {D}, hidden = "
                f"{hidden}); got {tuple(getattr(p, 'shape', ())) or type(p).__name__}"
            )
        if p.dtype != u.dtype or p.device != u.device:
            raise ValueError(
                f"{net} net parameter {j} is {p.dtype} on {p.device} but u is {u.dtype} on "
                f"{u.device}; move the nets with .to(u.dtype, u.device)"
            )


def check_layer_inputs(u, ldj, params, n_mlp) -> int:
    """Validate the op's inputs (see the module docstring); returns ``n_res_blocks``."""
    if not isinstance(u, torch.Tensor) or u.dim() != 4 or u.shape[-1] != u.shape[-2]:
        raise ValueError(f"u must be a patch tensor (N, C, k, k); got {getattr(u, 'shape', type(u))}")
    if u.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"u must be a floating-point tensor; got {u.dtype}")
    if not isinstance(ldj, torch.Tensor) or ldj.dim() != 1 or ldj.shape[0] < 1 or u.shape[0] % ldj.shape[0]:
        raise ValueError(
            f"ldj must be the per-image log-det (B,) with N = B·P rows in u; got ldj of shape "
            f"{tuple(getattr(ldj, 'shape', ()))} for u of shape {tuple(u.shape)}"
        )
    if not isinstance(n_mlp, int) or isinstance(n_mlp, bool) or n_mlp < 1:
        raise ValueError(f"n_mlp must be a positive int; got {n_mlp!r}")
    n_res = net_layout(len(params), n_mlp)
    D = u.shape[1] * u.shape[2] * u.shape[3]
    hidden = params[3].shape[0] if n_res and isinstance(params[3], torch.Tensor) else D  # first bias
    expected = _param_shapes(n_res, n_mlp, D, hidden)
    # one comparison of all shapes, dtypes and devices (a per-tensor loop costs a model more
    # than a small layer's arithmetic); only on a mismatch, the loop that names the tensor
    if not (
        all(isinstance(p, torch.Tensor) for p in params)
        and [p.shape for p in params] == expected
        and {(p.dtype, p.device) for p in params} == {(u.dtype, u.device)}
    ):
        _raise_for_wrong_param(u, params, expected, D, hidden)
    if ldj.dtype != u.dtype or ldj.device != u.device:
        raise ValueError(f"ldj ({ldj.dtype}, {ldj.device}) must match u ({u.dtype}, {u.device})")
    return n_res


def rg_coupling_layer(u, ldj, params, n_mlp, inverse=False, recompute=False, precision="fp32"):
    """One RNVP coupling layer on RG patches, nets and coupling fused (module docstring).

    ``u (N, C, k, k)``, ``ldj (B,)``, ``params`` the flat list of both nets' tensors.
    Returns ``(u' (N, C, k, k), ldj' (B,))``. ``inverse=True`` undoes the layer (and
    subtracts its log-det). ``recompute=True`` lets a fused backend keep only the inputs
    for the backward pass and recompute the nets' activations there (less memory, one more
    forward's worth of work). ``precision`` (:data:`PRECISIONS`) is the products' math on
    a backend that has such modes (Triton on a GPU); the others compute in ``u``'s dtype.
    Differentiable in ``u``, ``ldj`` and every parameter.
    """
    check_layer_inputs(u, ldj, params, n_mlp)
    if not isinstance(inverse, bool) or not isinstance(recompute, bool):
        raise TypeError(f"inverse and recompute must be bools; got {inverse!r}, {recompute!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return backends.resolve(u).rg_coupling_layer(u, ldj, list(params), n_mlp, inverse, recompute, precision)


def register_fake_kernels(namespace: str) -> None:
    """Fake (shape-only) kernels of a namespace's layer ops, so that ``torch.compile`` traces
    them: ``rg_coupling_layer``, ``rg_coupling_layer_forward`` (which also returns the saved
    activations, ``N · row_width`` values, or none) and ``rg_coupling_layer_backward``. Their
    autograd is registered with the kernels (C++)."""

    def layer_fake(u, ldj, params, n_mlp, inverse, recompute):
        return u.new_empty(u.shape), ldj.new_empty(ldj.shape)

    def forward_fake(u, ldj, params, n_mlp, inverse, store):
        D = u.shape[1] * u.shape[2] * u.shape[3]
        n_res = net_layout(len(params), n_mlp)
        hidden = params[3].shape[0] if n_res else D  # the first linear layer's bias
        row_width = 2 * (D + 2 * ((n_res + 1) * D + n_res * n_mlp * hidden))
        acts = u.new_empty(u.shape[0] * row_width if store else 0)
        return u.new_empty(u.shape), ldj.new_empty(ldj.shape), acts

    def backward_fake(u, acts, params, grad_y, grad_ldj, n_mlp, inverse):
        return u.new_empty(u.shape), [p.new_empty(p.shape) for p in params]

    torch.library.register_fake(f"{namespace}::rg_coupling_layer", layer_fake)
    torch.library.register_fake(f"{namespace}::rg_coupling_layer_forward", forward_fake)
    torch.library.register_fake(f"{namespace}::rg_coupling_layer_backward", backward_fake)
