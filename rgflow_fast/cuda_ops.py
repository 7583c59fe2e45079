"""Backend ``"cuda"``: the RG ops as CUDA kernels (``csrc/rg_coupling_cuda.cu``), for GPUs where
Triton is unavailable or slower.

Runs float32, float64, float16 and bfloat16 on CUDA tensors (half precision computes in
float32). The log-det is reduced in a fixed order (no atomics), so results are deterministic.
The extension is built on first use when torch is a CUDA build, a GPU is visible and nvcc is
installed (see :mod:`rgflow_fast._extension`).
"""
from __future__ import annotations

import torch

from . import _extension
from ._extension import rg_coupling, rg_coupling_inverse, rg_coupling_step, rg_gather, rg_scatter

__all__ = ["rg_gather", "rg_scatter", "rg_coupling", "rg_coupling_inverse", "rg_coupling_step"]

NAME = "cuda"


def unavailable_reason():
    """Why the CUDA extension cannot load here (None once it has loaded; builds it if needed)."""
    return _extension.unavailable_reason("cuda")


def unsupported_reason(x: torch.Tensor):
    """Why the CUDA kernels cannot run on tensor ``x`` (None if they can)."""
    if x.device.type != "cuda":
        return (
            f"the CUDA kernels run on CUDA tensors, not {x.device.type}; use backend 'cpp' or "
            f"'auto' for CPU tensors"
        )
    if x.dtype not in _extension.DTYPES:
        return f"dtype {x.dtype} is not supported (use float32, float64, float16 or bfloat16)"
    return None
