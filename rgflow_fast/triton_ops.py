"""Backend ``"triton"``: the RG ops on the fused Triton kernels of
:mod:`rgflow_fast.kernels.rg_coupling`.

The ops of the backend contract (:mod:`rgflow_fast.backends`) are ``torch.library`` custom
ops in the namespace ``rgflow_fast_triton``, registered with fake kernels and autograd
formulas by :func:`rgflow_fast.backends.register_ops`, so ``torch.compile`` traces models
that use them without graph breaks. The coupling backward is one fused kernel that
recomputes ``tanh s`` and ``exp`` from the saved inputs ``x, s, t`` (nothing else is saved).
Gather and scatter are differentiable any number of times; the coupling op once: double
backward through it raises (use backend ``"torch"`` for higher-order gradients).

Runs on CUDA tensors (float32, float64, float16, bfloat16 where the GPU has it; half
precision computes in float32 and rounds once per output, so it matches the reference to
that dtype's rounding: about 1e-2 relative for bfloat16, 1e-3 for float16), and on CPU
tensors (float32, float64) in Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton
is first imported; slow, for tests).
"""
from __future__ import annotations

import torch

from . import backends, triton_layer

NAME = "triton"
_MIN_TRITON = (3, 3)

# The dtypes the kernels run, per device type (CPU: in the interpreter only).
DTYPES = {
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
}

try:
    import triton

    from .kernels import rg_coupling as _kernels

    _IMPORT_ERROR = None
except ImportError as exc:  # no triton, or a triton too old for the kernels
    _kernels = None
    _IMPORT_ERROR = exc
else:
    _ops = backends.register_ops("rgflow_fast_triton", _kernels.KERNELS, label="backend 'triton'")


def unavailable_reason():
    """Why this backend cannot load here (None if it can)."""
    if _kernels is None:
        return f"Triton is not importable ({_IMPORT_ERROR}); pip install 'triton>=3.3'"
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if version < _MIN_TRITON:
        return f"Triton {triton.__version__} is too old; pip install 'triton>=3.3'"
    return None


def unsupported_reason(x: torch.Tensor):
    """Why the kernels cannot run on tensor ``x`` (None if they can)."""
    if x.device.type == "cpu" and not _kernels.INTERPRETED:
        return (
            "Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
            "Triton is first imported (slow; for tests), or move the tensors to a GPU"
        )
    if x.device.type == "cuda" and x.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support (use float16, float32 or float64)"
    return backends.unsupported_by_table(x, DTYPES)


# --- the backend contract (see rgflow_fast.backends) ----------------------------------------


def rg_gather(x, kernel_size, dilation, offset):
    return _ops.rg_gather(x, kernel_size, dilation, offset)


def rg_scatter(patches, x, kernel_size, dilation, offset):
    return _ops.rg_scatter(patches, x, kernel_size, dilation, offset)


def rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
    return _ops.rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit)


def rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision="fp32"):
    return triton_layer.backend_rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision)
