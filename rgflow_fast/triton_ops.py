"""Backend ``"triton"``: the RG ops on the fused Triton kernels of
:mod:`rgflow_fast.kernels.rg_coupling`.

Each op is a ``torch.library`` custom op in the namespace ``rgflow_fast_triton`` with a fake
(meta) kernel and an autograd formula, so ``torch.compile`` traces models that use them
without graph breaks:

    rgflow_fast_triton::gather(x, k, d, off) -> patches
    rgflow_fast_triton::scatter(patches?, base?, L, k, d, off) -> image
    rgflow_fast_triton::coupling(x, s, t, k, d, off, parity, inverse, emit) -> (y, ldj, v)
    rgflow_fast_triton::coupling_backward(x, s, t, g_y, g_ldj, g_v?, k, d, off, parity, inverse)
        -> (g_x, g_s, g_t)

The coupling backward is one fused kernel that recomputes ``tanh s`` and ``exp`` from the
saved inputs ``x, s, t`` (nothing else is saved). Gather and scatter are twice
differentiable; the coupling ops are differentiable once: double backward through them
raises (use backend ``"torch"`` for higher-order gradients).

Runs on CUDA tensors (float32, float64, float16, bfloat16 where the GPU has it; half
precision computes in float32 and rounds once per output, so it matches the reference to
that dtype's rounding: about 1e-2 relative for bfloat16, 1e-3 for float16), and on CPU
tensors (float32, float64) in Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton
is first imported; slow, for tests).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NAME = "triton"
_MIN_TRITON = (3, 3)

try:
    import triton

    from .kernels import rg_coupling as _kernels

    _IMPORT_ERROR = None
except ImportError as exc:  # no triton, or a triton too old for the kernels
    _kernels = None
    _IMPORT_ERROR = exc


def unavailable_reason():
    """Why this backend cannot load here (None if it can)."""
    if _kernels is None:
        return f"Triton is not importable ({_IMPORT_ERROR}); pip install 'triton>=3.3'"
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if version < _MIN_TRITON:
        return f"Triton {triton.__version__} is too old; pip install 'triton>=3.3'"
    return None


def unsupported_reason(x: Tensor):
    """Why the kernels cannot run on tensor ``x`` (None if they can)."""
    if x.device.type == "cuda":
        if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} is not supported (use float32, float64, float16 or bfloat16)"
        if x.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16 support (use float16, float32 or float64)"
        return None
    if x.device.type == "cpu":
        if not _kernels.INTERPRETED:
            return (
                "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                "Triton is first imported (slow; for tests), or move the tensors to a GPU"
            )
        if x.dtype not in (torch.float32, torch.float64):
            return (
                f"the Triton interpreter runs float32 and float64 only (got {x.dtype}); convert, "
                f"or run half precision on a GPU"
            )
        return None
    return f"Triton kernels run on CUDA tensors (or CPU tensors in its interpreter), not on {x.device.type}"


def _num_patches(image_size, kernel_size, dilation):
    return (image_size // (kernel_size * dilation)) ** 2


# --- gather / scatter -------------------------------------------------------------------


@torch.library.custom_op("rgflow_fast_triton::gather", mutates_args=())
def _gather(x: Tensor, kernel_size: int, dilation: int, offset: int) -> Tensor:
    return _kernels.gather(x, kernel_size, dilation, offset)


@_gather.register_fake
def _(x, kernel_size, dilation, offset):
    P = _num_patches(x.shape[-1], kernel_size, dilation)
    return x.new_empty(x.shape[0] * P, x.shape[1], kernel_size, kernel_size)


def _gather_setup(ctx, inputs, output):
    x, *geometry = inputs
    ctx.image_size = x.shape[-1]
    ctx.geometry = geometry


def _gather_backward(ctx, grad):
    return _scatter(grad, None, ctx.image_size, *ctx.geometry), None, None, None


_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("rgflow_fast_triton::scatter", mutates_args=())
def _scatter(
    patches: Optional[Tensor], base: Optional[Tensor], image_size: int, kernel_size: int, dilation: int, offset: int
) -> Tensor:
    """``patches`` on the patch pixels, ``base`` elsewhere; a None operand reads as zeros."""
    return _kernels.scatter(patches, base, image_size, kernel_size, dilation, offset)


@_scatter.register_fake
def _(patches, base, image_size, kernel_size, dilation, offset):
    if base is not None:
        return base.new_empty(base.shape)
    B = patches.shape[0] // _num_patches(image_size, kernel_size, dilation)
    return patches.new_empty(B, patches.shape[1], image_size, image_size)


def _scatter_setup(ctx, inputs, output):
    patches, base, *geometry = inputs
    ctx.has = (patches is not None, base is not None)
    ctx.geometry = geometry


def _scatter_backward(ctx, grad):
    _, *geometry = ctx.geometry
    g_patches = _gather(grad, *geometry) if ctx.has[0] else None
    g_base = _scatter(None, grad, *ctx.geometry) if ctx.has[1] else None
    return g_patches, g_base, None, None, None, None


_scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# --- coupling -----------------------------------------------------------------------------


@torch.library.custom_op("rgflow_fast_triton::coupling", mutates_args=())
def _coupling(
    x: Tensor, s: Tensor, t: Tensor, kernel_size: int, dilation: int, offset: int, parity: int,
    inverse: bool, emit: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, ldj, v)``: see :func:`rgflow_fast.kernels.rg_coupling.coupling`."""
    return _kernels.coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit)


@_coupling.register_fake
def _(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
    v = s.new_empty(s.shape) if emit else x.new_empty(0)
    return x.new_empty(x.shape), x.new_empty(x.shape[0]), v


def _coupling_setup(ctx, inputs, output):
    x, s, t, *geometry, inverse, emit = inputs
    ctx.save_for_backward(x, s, t)
    ctx.geometry = geometry
    ctx.inverse = inverse
    ctx.emit = emit


def _coupling_grad(ctx, g_y, g_ldj, g_v):
    x, s, t = ctx.saved_tensors
    g_y = torch.zeros_like(x) if g_y is None else g_y
    g_ldj = x.new_zeros(x.shape[0]) if g_ldj is None else g_ldj
    g_v = g_v if ctx.emit else None
    g_x, g_s, g_t = _coupling_backward(x, s, t, g_y, g_ldj, g_v, *ctx.geometry, ctx.inverse)
    return g_x, g_s, g_t, None, None, None, None, None, None


_coupling.register_autograd(_coupling_grad, setup_context=_coupling_setup)


@torch.library.custom_op("rgflow_fast_triton::coupling_backward", mutates_args=())
def _coupling_backward(
    x: Tensor, s: Tensor, t: Tensor, g_y: Tensor, g_ldj: Tensor, g_v: Optional[Tensor],
    kernel_size: int, dilation: int, offset: int, parity: int, inverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g_x, g_s, g_t)``: see :func:`rgflow_fast.kernels.rg_coupling.coupling_backward`."""
    return _kernels.coupling_backward(x, s, t, g_y, g_ldj, g_v, kernel_size, dilation, offset, parity, inverse)


@_coupling_backward.register_fake
def _(x, s, t, g_y, g_ldj, g_v, kernel_size, dilation, offset, parity, inverse):
    return x.new_empty(x.shape), s.new_empty(s.shape), t.new_empty(t.shape)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "the Triton backend's rg_coupling ops are differentiable once; for higher-order "
        "gradients run them under rgflow_fast.use_backend('torch')"
    )


_coupling_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --- the backend interface (see rgflow_fast.backends) -------------------------------------


def rg_gather(x, kernel_size, dilation, offset):
    return _gather(x, kernel_size, dilation, offset)


def rg_scatter(patches, x, kernel_size, dilation, offset):
    return _scatter(patches, x, x.shape[-1], kernel_size, dilation, offset)


def rg_coupling(x, s, t, kernel_size, dilation, offset, parity):
    y, ldj, _ = _coupling(x, s, t, kernel_size, dilation, offset, parity, False, False)
    return y, ldj


def rg_coupling_inverse(y, s, t, kernel_size, dilation, offset, parity):
    x, inv_ldj, _ = _coupling(y, s, t, kernel_size, dilation, offset, parity, True, False)
    return x, inv_ldj


def rg_coupling_step(x, s, t, kernel_size, dilation, offset, parity, inverse):
    return _coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, True)

