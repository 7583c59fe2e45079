"""Backends ``"cpp"`` and ``"cuda"``: the two device kinds of the C++/CUDA extension.

The extension defines the ops of the backend contract (:mod:`rgflow_fast.backends`) once, as
``torch.library`` ops in the namespace ``rgflow_fast`` (schema: ``csrc/rg_coupling.cpp``),
with CPU kernels (``csrc/rg_coupling.cpp``) and CUDA kernels of the same schema
(``csrc/rg_coupling_cuda.cu``); torch dispatches each call on the tensors' device. This module
registers their fake kernels and autograd formulas (:func:`rgflow_fast.backends.register_ops`)
and states, per device kind, the backend name and the dtypes its kernels are compiled for.

- ``"cpp"`` (CPU): one pass per op, parallel over image rows (``at::parallel_for``), with
  vectorised inner loops; ``"auto"`` picks it for CPU tensors. Results are bitwise identical
  for any number of threads.
- ``"cuda"``: for GPUs where Triton is unavailable or slower; the log-det is reduced in a fixed
  order (no atomics), so results are deterministic.

Both run float32, float64, float16 and bfloat16 (half precision computes in float32). Each part
of the extension is built on first use (see :mod:`rgflow_fast._extension`); the CUDA part needs
a CUDA build of torch, a visible GPU and nvcc.
"""
from __future__ import annotations

import functools

import torch

from . import _extension, backends, coupling_layer, reference

__all__ = ["ExtensionBackend", "DEVICE_KINDS", "cpp", "cuda",
           "activation_cache", "empty_activation_cache"]

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# device type (= part of the extension) -> backend name and the dtypes its kernels are compiled
# for (RG_DISPATCH in csrc/)
DEVICE_KINDS = {
    "cpu": ("cpp", _FLOATS),
    "cuda": ("cuda", _FLOATS),
}


# the fused coupling layer (csrc/rg_coupling_layer.cpp) has CPU kernels only; elsewhere the
# backend runs the reference layer between its own gather and scatter
LAYER_DTYPES = {"cpu": (torch.float32, torch.float64)}


@functools.lru_cache(maxsize=None)
def _register():
    """Fake kernels and autograd of the ops, once the schema (the CPU part) has loaded."""
    backends.register_ops("rgflow_fast", label="backends 'cpp' and 'cuda'")
    coupling_layer.register_fake_kernels("rgflow_fast")


class ExtensionBackend:
    """One device kind of the extension as a backend: the shared ops, this kind's probes."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.NAME, dtypes = DEVICE_KINDS[device_type]
        self._dtypes = {device_type: dtypes}

    def __repr__(self):
        return f"<rgflow_fast backend {self.NAME!r} (C++ extension, {self.device_type} kernels)>"

    def unavailable_reason(self):
        """Why this part of the extension cannot load here (None once it has loaded; builds it
        if needed)."""
        reason = _extension.unavailable_reason(self.device_type)
        if reason is None:
            _register()
        return reason

    def unsupported_reason(self, x: torch.Tensor):
        """Why these kernels cannot run on tensor ``x`` (None if they can)."""
        return backends.unsupported_by_table(x, self._dtypes)

    # --- the backend contract (see rgflow_fast.backends), the same ops on both kinds ---------

    @staticmethod
    def rg_gather(x, kernel_size, dilation, offset):
        return torch.ops.rgflow_fast.rg_gather(x, kernel_size, dilation, offset)

    @staticmethod
    def rg_scatter(patches, x, kernel_size, dilation, offset):
        return torch.ops.rgflow_fast.rg_scatter(patches, x, kernel_size, dilation, offset)

    @staticmethod
    def rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
        return torch.ops.rgflow_fast.rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit)

    @staticmethod
    def rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision="fp32"):
        # the C++ layer computes in u's dtype: every precision mode is its exact mode
        if backends.unsupported_by_table(u, LAYER_DTYPES) is None:
            return torch.ops.rgflow_fast.rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute)
        return reference.rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute)


cpp = ExtensionBackend("cpu")
cuda = ExtensionBackend("cuda")


def _activation_cache(release: bool) -> dict:
    try:  # nothing is cached before the extension has loaded, and asking must not build it
        op = torch.ops.rgflow_fast.rg_coupling_layer_cpu_activation_cache
    except AttributeError:
        return {"live": 0, "kept": 0}
    live, kept = op(release)
    return {"live": live, "kept": kept}


def activation_cache() -> dict:
    """Bytes of the activations the C++ coupling layer saves for training's backward:
    ``{"live": held by tensors now, "kept": freed blocks kept for the next forward}``.

    A training step frees them after its backward and the next one allocates the same sizes
    again; the layer keeps the freed blocks and reuses them, since fresh pages from the system
    cost a page fault per 4 KiB. Live plus kept never exceeds the most ever live at once. All
    zero before the extension has loaded."""
    return _activation_cache(False)


def empty_activation_cache() -> int:
    """Frees the blocks :func:`activation_cache` keeps (after training, say); returns how many
    bytes were freed."""
    return _activation_cache(True)["kept"]
