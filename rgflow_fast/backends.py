"""Backends: the one contract every RG op runs through, its registration with
``torch.library``, and the selection of a backend per call.

**The contract.** A backend is a module (or, for the two device kinds of the C++ extension,
an object of :mod:`rgflow_fast.cpp_ops`) with ``NAME`` and these ops, the same signatures on
every backend (image ``x (B, C, L, L)``, patches ``(B*P, C, k, k)``; formulas in
:mod:`rgflow_fast.reference`)::

    rg_gather(x, k, d, off) -> patches
    rg_scatter(patches, x, k, d, off) -> image: patches on the patch pixels, x elsewhere
    rg_coupling(x, s, t, k, d, off, parity, inverse, emit) -> (y, ldj (B,), v)
        one checkerboard coupling step (``inverse``: its inverse); ``v`` is, if ``emit``, the
        next step's net input ``checkerboard(parity) * rg_gather(y)``, else an empty tensor
    rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision) -> (u', ldj')
        one whole coupling layer, nets included, on the patch tensor
        (:mod:`rgflow_fast.coupling_layer`)

plus two probes: ``unavailable_reason()`` (why it cannot load at all, or None) and
``unsupported_reason(x)`` (why it cannot run on tensor ``x``, or None). The public ops of
:mod:`rgflow_fast.functional` validate their inputs and call these.

The fast backends implement the first three ops, and their backward
``rg_coupling_backward(x, s, t, grad_y, grad_ldj, grad_v?, k, d, off, parity, inverse) ->
(grad_x, grad_s, grad_t)``, as ``torch.library`` ops of one namespace each (schemas:
:data:`OP_SCHEMAS`); :func:`register_ops` gives a namespace its fake kernels and autograd
formulas (and, for Python kernels, defines the ops). The reference (``"torch"``) is plain
PyTorch, differentiated by autograd.

**Selection.** ``"torch"`` is the reference; ``"auto"`` takes, for each call, the first
backend of the device's preference list that can run on the tensors, else the reference.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from .geometry import num_patches

__all__ = [
    "BACKENDS",
    "OP_SCHEMAS",
    "use_backend",
    "current_backend",
    "available_backends",
    "resolve",
    "register_ops",
    "unsupported_by_table",
]

ENV_VAR = "RGFLOW_FAST_BACKEND"

BACKENDS = ("torch", "triton", "cpp", "cuda")
# name -> "module" or "module:attribute" (cpp and cuda are the two device kinds of one module)
_SOURCES = {
    "torch": "rgflow_fast.reference",
    "triton": "rgflow_fast.triton_ops",
    "cpp": "rgflow_fast.cpp_ops:cpp",
    "cuda": "rgflow_fast.cpp_ops:cuda",
}
# The backends "auto" tries, in order, per device type; the reference runs what none of them can.
AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda"),
    "cpu": ("cpp",),
}

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rgflow_fast_backend", default=None
)


def _check_name(name: str, source: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r} ({source}); choose one of 'auto', "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    return name


# A plain dict rather than functools.lru_cache: torch.compile reads it without tracing the import.
_loaded: dict[str, tuple[object | None, str | None]] = {}


def _load(name: str) -> tuple[object | None, str | None]:
    """Import a backend once; returns (backend, None) or (None, reason)."""
    if name not in _loaded:
        module_name, _, attribute = _SOURCES[name].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            _loaded[name] = None, f"its module could not be imported ({exc})"
        else:
            backend = getattr(module, attribute) if attribute else module
            reason = backend.unavailable_reason()
            _loaded[name] = (None, reason) if reason else (backend, None)
    return _loaded[name]


def current_backend() -> str:
    """The requested backend name: set by :func:`use_backend`, else ``$RGFLOW_FAST_BACKEND``,
    else ``"auto"``."""
    name = _requested.get()
    if name is None:
        name = _check_name(os.environ.get(ENV_VAR, "auto").strip() or "auto", f"${ENV_VAR}")
    return name


def available_backends() -> list[str]:
    """Backends that load on this machine (each may still reject some devices or dtypes)."""
    return [name for name in BACKENDS if _load(name)[0] is not None]


def use_backend(name: str):
    """Context manager: run RG ops inside it on backend ``name`` (or ``"auto"``).

    Raises when called (not only when entered) if the name is unknown or the backend cannot
    load here, saying why.
    """
    _check_name(name, "use_backend")
    if name != "auto":
        backend, reason = _load(name)
        if backend is None:
            raise RuntimeError(
                f"backend {name!r} is not available: {reason}. Available: "
                f"{available_backends()} (or 'auto')."
            )
    return _requesting(name)


@contextlib.contextmanager
def _requesting(name: str):
    token = _requested.set(name)
    try:
        yield name
    finally:
        _requested.reset(token)


def resolve(x: torch.Tensor):
    """The backend that runs an op on tensor ``x`` under the current request."""
    name = current_backend()
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(x.device.type, ()):
            backend = _load(candidate)[0]
            if backend is not None and backend.unsupported_reason(x) is None:
                return backend
        return _load("torch")[0]
    backend, reason = _load(name)
    if backend is None:
        raise RuntimeError(
            f"backend {name!r} is not available: {reason}. Available: {available_backends()}."
        )
    reason = backend.unsupported_reason(x)
    if reason is not None:
        others = [
            b for b in available_backends() if b != name and _load(b)[0].unsupported_reason(x) is None
        ]
        raise RuntimeError(
            f"backend {name!r} cannot run on a {x.dtype} tensor on {x.device}: {reason}. "
            f"Backends that can: {others} (or use 'auto')."
        )
    return backend


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def unsupported_by_table(x: torch.Tensor, dtypes: Mapping[str, Sequence[torch.dtype]]) -> str | None:
    """Why kernels that run the dtypes ``dtypes[device type]`` cannot take ``x`` (None if
    they can): a backend states what it supports as this table, xformers-style."""
    supported = dtypes.get(x.device.type)
    if supported is None:
        return f"its kernels run on {' and '.join(dtypes)} tensors, not on {x.device.type}"
    if x.dtype not in supported:
        return (
            f"its kernels run {_dtype_names(supported)} on {x.device.type}, not {x.dtype}; "
            f"convert the tensors"
        )
    return None


# --- the fast backends' torch.library ops ---------------------------------------------------

# The op set of a fast backend, one schema each (the C++ extension defines the same schemas in
# csrc/rg_coupling.cpp). ``grad_v`` is None when the step emitted nothing (or nothing of it
# was used).
OP_SCHEMAS = {
    "rg_gather": "(Tensor x, int kernel_size, int dilation, int offset) -> Tensor",
    "rg_scatter": "(Tensor patches, Tensor x, int kernel_size, int dilation, int offset) -> Tensor",
    "rg_coupling": (
        "(Tensor x, Tensor s, Tensor t, int kernel_size, int dilation, int offset, int parity, "
        "bool inverse, bool emit) -> (Tensor, Tensor, Tensor)"
    ),
    "rg_coupling_backward": (
        "(Tensor x, Tensor s, Tensor t, Tensor grad_y, Tensor grad_ldj, Tensor? grad_v, "
        "int kernel_size, int dilation, int offset, int parity, bool inverse) "
        "-> (Tensor, Tensor, Tensor)"
    ),
}


def register_ops(namespace: str, kernels: Mapping[str, Callable] | None = None, label: str = ""):
    """Make the ops of :data:`OP_SCHEMAS` in ``torch.ops.<namespace>`` work with autograd,
    ``torch.compile`` and ``torch.library.opcheck``; returns ``torch.ops.<namespace>``.

    ``kernels`` maps each op name to a Python implementation (any device), and the ops are
    defined here; without it they must be defined already (a C++ extension's
    ``TORCH_LIBRARY``). Then every op gets its fake (meta) kernel and autograd formula:

    - gather and scatter are each other's adjoint, so they are differentiable any number of
      times: ``grad x = scatter(grad, 0)``; ``grad patches = gather(grad)``,
      ``grad x = scatter(0, grad)``;
    - ``rg_coupling`` saves only its inputs ``x, s, t``; its backward is the op
      ``rg_coupling_backward``, which recomputes ``tanh s`` and ``exp``. That op is not
      differentiable: double backward raises, naming the backend (``label``) and the remedy.

    Call once per namespace.
    """
    qualified = f"{namespace}::"
    if kernels is not None:
        for name, schema in OP_SCHEMAS.items():
            torch.library.custom_op(qualified + name, kernels[name], mutates_args=(), schema=schema)
    ops = getattr(torch.ops, namespace)

    def zeros(like, shape):
        # a zero operand of scatter without writing zeros: one element, broadcast
        return like.new_zeros(()).expand(shape)

    def gather_fake(x, kernel_size, dilation, offset):
        P = num_patches(x.shape[-1], kernel_size, dilation)
        return x.new_empty(x.shape[0] * P, x.shape[1], kernel_size, kernel_size)

    def gather_setup(ctx, inputs, output):
        x, *ctx.geometry = inputs
        ctx.image_shape = x.shape

    def gather_backward(ctx, grad):
        return ops.rg_scatter(grad, zeros(grad, ctx.image_shape), *ctx.geometry), None, None, None

    def scatter_fake(patches, x, kernel_size, dilation, offset):
        return x.new_empty(x.shape)

    def scatter_setup(ctx, inputs, output):
        patches, _, *ctx.geometry = inputs
        ctx.patch_shape = patches.shape

    def scatter_backward(ctx, grad):
        g_patches = ops.rg_gather(grad, *ctx.geometry) if ctx.needs_input_grad[0] else None
        g_x = None
        if ctx.needs_input_grad[1]:
            g_x = ops.rg_scatter(zeros(grad, ctx.patch_shape), grad, *ctx.geometry)
        return g_patches, g_x, None, None, None

    def coupling_fake(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
        v = s.new_empty(s.shape) if emit else x.new_empty(0)
        return x.new_empty(x.shape), x.new_empty(x.shape[0]), v

    def coupling_setup(ctx, inputs, output):
        x, s, t, *ctx.geometry, ctx.inverse, ctx.emit = inputs
        ctx.save_for_backward(x, s, t)

    def coupling_backward(ctx, g_y, g_ldj, g_v):
        x, s, t = ctx.saved_tensors
        g_y = torch.zeros_like(x) if g_y is None else g_y
        g_ldj = x.new_zeros(x.shape[0]) if g_ldj is None else g_ldj
        g_v = g_v if ctx.emit else None
        g_x, g_s, g_t = ops.rg_coupling_backward(x, s, t, g_y, g_ldj, g_v, *ctx.geometry, ctx.inverse)
        return g_x, g_s, g_t, None, None, None, None, None, None

    def coupling_backward_fake(x, s, t, g_y, g_ldj, g_v, kernel_size, dilation, offset, parity, inverse):
        return x.new_empty(x.shape), s.new_empty(s.shape), t.new_empty(t.shape)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            f"the rg_coupling ops of {label or namespace} are differentiable once; for "
            f"higher-order gradients run them under rgflow_fast.use_backend('torch')"
        )

    formulas = {
        "rg_gather": (gather_fake, gather_backward, gather_setup),
        "rg_scatter": (scatter_fake, scatter_backward, scatter_setup),
        "rg_coupling": (coupling_fake, coupling_backward, coupling_setup),
        "rg_coupling_backward": (coupling_backward_fake, no_double_backward, lambda ctx, inputs, output: None),
    }
    for name, (fake, backward, setup) in formulas.items():
        torch.library.register_fake(qualified + name, fake)
        torch.library.register_autograd(qualified + name, backward, setup_context=setup)
    return ops
