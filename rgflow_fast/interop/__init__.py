"""Adapters that put RG-Flow models and layers into other flow libraries.

Each library is an optional extra, imported only when its adapter module is imported:

    rgflow_fast.interop.freia       FrEIA       pip install "rgflow-fast[freia]"
    rgflow_fast.interop.normflows   normflows   pip install "rgflow-fast[normflows]"
    rgflow_fast.interop.nflows      nflows      pip install "rgflow-fast[nflows]"

(``pip install "rgflow-fast[interop]"`` installs all three.)

The adapters wrap any module with our direction convention — ``forward(x) -> (z, ldj)``
data → latent with ``ldj = log|det ∂z/∂x|``, and ``inverse(z) -> (x, -ldj)`` — such as an
:class:`rgflow_fast.RGFlow`, one of its blocks (``model.blocks[i]``), or an
:class:`rgflow_fast.nn.CheckerboardAffineCoupling` (which also takes ``context=``). FrEIA's
and nflows' ``forward`` is data → latent like ours; normflows' ``forward`` is latent → data.
"""
from __future__ import annotations

import importlib
import inspect

import torch

__all__ = ["freia", "normflows", "nflows"]

# adapter module -> (library module, extra, pip name)
_LIBRARIES = {
    "freia": ("FrEIA", "freia", "FrEIA"),
    "normflows": ("normflows", "normflows", "normflows"),
    "nflows": ("nflows", "nflows", "nflows"),
}


def _require(adapter: str):
    """Import the library behind ``rgflow_fast.interop.<adapter>``, or say how to install it."""
    module, extra, pip_name = _LIBRARIES[adapter]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"rgflow_fast.interop.{adapter} needs the optional library {module!r}, which is not "
            f"installed: pip install 'rgflow-fast[{extra}]' (or pip install {pip_name})"
        ) from exc


def __getattr__(name):
    # `rgflow_fast.interop.freia` etc. import on first use, so the package imports without them
    if name in _LIBRARIES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_flow_module(model, adapter: str):
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "inverse", None)):
        raise TypeError(
            f"{adapter} wraps an invertible nn.Module with forward(x) -> (z, ldj) and "
            f"inverse(z) -> (x, -ldj): an rgflow_fast.RGFlow, one of its blocks "
            f"(model.blocks[i]) or an rgflow_fast.nn.CheckerboardAffineCoupling; got "
            f"{type(model).__name__}"
        )
    return model


def _takes_context(model) -> bool:
    return "context" in inspect.signature(model.forward).parameters


def _apply(model, x, inverse: bool, context=None):
    """``model(x)`` (data → latent) or ``model.inverse(x)``, passing ``context`` when given.

    Returns ``(out, log|det ∂out/∂x|)``: our modules return the log-det of the direction run.
    """
    if context is None:
        return model.inverse(x) if inverse else model(x)
    if not _takes_context(model):
        raise ValueError(
            f"a context was given but {type(model).__name__} takes none; only conditional "
            f"layers accept one (e.g. rgflow_fast.nn.CheckerboardAffineCoupling, whose net is "
            f"called as net(v, context))"
        )
    return model.inverse(x, context=context) if inverse else model(x, context=context)


def _prior_of(prior_or_model, adapter: str):
    """The :class:`rgflow_fast.priors.Prior` of a model, or the prior itself."""
    from ..priors import Prior

    prior = getattr(prior_or_model, "prior", prior_or_model)
    if not isinstance(prior, Prior):
        raise TypeError(
            f"{adapter} takes an rgflow_fast.RGFlow or its prior (model.prior); got "
            f"{type(prior_or_model).__name__}"
        )
    return prior
