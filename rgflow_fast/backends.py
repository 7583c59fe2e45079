"""Backend selection: the one dispatch point every RG op goes through.

Backends are modules that implement the ops of :mod:`rgflow_fast.functional`
(``rg_gather``, ``rg_scatter``, ``rg_coupling``, ``rg_coupling_inverse`` and
``rg_coupling_step(x, s, t, k, d, off, parity, inverse) -> (y, ldj, v)``: one coupling step
that also returns the next step's net input ``v = checkerboard(parity) ⊙ gather(y)``; see
``rgflow_fast.reference.rg_coupling_step``) plus two probes:
``unavailable_reason()`` (why the backend cannot load at all, or None) and
``unsupported_reason(tensor)`` (why it cannot run on that tensor, or None).

``"torch"`` is the pure-PyTorch reference; ``"auto"`` takes, for each call, the first
backend of the device's preference list that can run on the tensors.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from types import ModuleType

import torch

__all__ = ["BACKENDS", "use_backend", "current_backend", "available_backends", "resolve"]

ENV_VAR = "RGFLOW_FAST_BACKEND"

BACKENDS = ("torch", "triton", "cpp", "cuda")
_MODULES = {
    "torch": "rgflow_fast.reference",
    "triton": "rgflow_fast.triton_ops",
    "cpp": "rgflow_fast.cpp_ops",
    "cuda": "rgflow_fast.cuda_ops",
}
# Order in which "auto" tries backends, per device type.
AUTO_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpp", "torch"),
}
_DEFAULT_PREFERENCE = ("torch",)

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
_loaded: dict[str, tuple[ModuleType | None, str | None]] = {}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import a backend once; returns (module, None) or (None, reason)."""
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            _loaded[name] = None, f"its module could not be imported ({exc})"
        else:
            reason = module.unavailable_reason()
            _loaded[name] = (None, reason) if reason else (module, None)
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


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run RG ops inside it on backend ``name`` (or ``"auto"``).

    Raises at entry if the backend cannot load here, saying why.
    """
    _check_name(name, "use_backend")
    if name != "auto":
        module, reason = _load(name)
        if module is None:
            raise RuntimeError(
                f"backend {name!r} is not available: {reason}. Available: "
                f"{available_backends()} (or 'auto')."
            )
    token = _requested.set(name)
    try:
        yield name
    finally:
        _requested.reset(token)


def resolve(x: torch.Tensor) -> ModuleType:
    """The backend module that runs an op on tensor ``x`` under the current request."""
    name = current_backend()
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(x.device.type, _DEFAULT_PREFERENCE):
            module = _load(candidate)[0]
            if module is not None and module.unsupported_reason(x) is None:
                return module
        raise RuntimeError(f"no backend can run on a {x.dtype} tensor on {x.device}")
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(
            f"backend {name!r} is not available: {reason}. Available: {available_backends()}."
        )
    reason = module.unsupported_reason(x)
    if reason is not None:
        others = [
            b for b in available_backends() if b != name and _load(b)[0].unsupported_reason(x) is None
        ]
        raise RuntimeError(
            f"backend {name!r} cannot run on a {x.dtype} tensor on {x.device}: {reason}. "
            f"Backends that can: {others} (or use 'auto')."
        )
    return module
