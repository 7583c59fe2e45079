"""Backend ``"cpp"``: the RG ops as C++ CPU kernels (``csrc/rg_coupling.cpp``).

One pass per op, parallel over image rows (``at::parallel_for``), with vectorised inner loops;
``"auto"`` picks it for CPU tensors. Runs float32, float64, float16 and bfloat16 (half
precision computes in float32). Results are bitwise identical for any number of threads.
The extension is built on first use (see :mod:`rgflow_fast._extension`).
"""
from __future__ import annotations

import torch

from . import _extension
from ._extension import rg_coupling, rg_coupling_inverse, rg_coupling_step, rg_gather, rg_scatter

__all__ = ["rg_gather", "rg_scatter", "rg_coupling", "rg_coupling_inverse", "rg_coupling_step"]

NAME = "cpp"


def unavailable_reason():
    """Why the C++ extension cannot load here (None once it has loaded; builds it if needed)."""
    return _extension.unavailable_reason("cpu")


def unsupported_reason(x: torch.Tensor):
    """Why the C++ kernels cannot run on tensor ``x`` (None if they can)."""
    if x.device.type != "cpu":
        return (
            f"the C++ kernels run on CPU tensors, not {x.device.type}; use backend 'cuda', "
            f"'triton' or 'auto' for GPU tensors"
        )
    if x.dtype not in _extension.DTYPES:
        return f"dtype {x.dtype} is not supported (use float32, float64, float16 or bfloat16)"
    return None
