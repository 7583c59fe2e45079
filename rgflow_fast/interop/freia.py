"""FrEIA adapters (``pip install "rgflow-fast[freia]"``).

FrEIA's conventions: an ``InvertibleModule`` is built as ``Module(dims_in, dims_c, **kwargs)``
with ``dims_in = [(C, H, W)]`` (no batch dimension) and reports its output shapes through
``output_dims``; ``forward(x_or_z, c=[], rev=False, jac=True)`` takes and returns a tuple of
tensors and the log-det of the direction run: data → latent (``rev=False``) returns
``log|det ∂z/∂x|``, ``rev=True`` returns ``-log|det ∂z/∂x|`` — the same direction as ours.
FrEIA has no prior object: ``log p(x) = prior.log_prob(z) + log_jac_det``.

- :class:`RGFlowBlock` wraps an RG-Flow model, one of its blocks, or a
  :class:`rgflow_fast.nn.CheckerboardAffineCoupling`:
  ``inn.append(RGFlowBlock, model=model)``.
- :class:`CheckerboardCouplingBlock` is a RealNVP checkerboard coupling block built from a
  FrEIA ``subnet_constructor``, running on the fused coupling op.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _apply, _check_flow_module, _require, _takes_context
from ..nn import CheckerboardAffineCoupling

_require("freia")
from FrEIA.modules import InvertibleModule  # noqa: E402

__all__ = ["RGFlowBlock", "CheckerboardCouplingBlock"]


def _single_input(dims_in, name):
    dims_in = list(dims_in)
    if len(dims_in) != 1 or len(dims_in[0]) != 3 or dims_in[0][1] != dims_in[0][2]:
        raise ValueError(f"{name} takes one square image input, dims_in = [(C, L, L)]; got {dims_in}")
    return tuple(dims_in[0])


def _one_tensor(x_or_z, name):
    if isinstance(x_or_z, torch.Tensor) or len(x_or_z) != 1:
        raise ValueError(
            f"{name} takes FrEIA's tuple of inputs with one image tensor, (x,); got "
            f"{type(x_or_z).__name__}{'' if isinstance(x_or_z, torch.Tensor) else f' of length {len(x_or_z)}'}"
        )
    return x_or_z[0]


def _conditions(c):
    """FrEIA's list of condition tensors as one context: None, the tensor, or several
    concatenated along dim 1 (FrEIA's coupling blocks do the same)."""
    if not c:
        return None
    return c[0] if len(c) == 1 else torch.cat(list(c), dim=1)


class RGFlowBlock(InvertibleModule):
    """A FrEIA ``InvertibleModule`` running ``model``: ``SequenceINN.append(RGFlowBlock, model=model)``.

    ``model``: an :class:`rgflow_fast.RGFlow`, one block ``model.blocks[i]``, or an
    :class:`rgflow_fast.nn.CheckerboardAffineCoupling`. ``dims_in = [(C, L, L)]``; the output
    has the same shape. ``forward((x,), c) -> ((z,), log|det ∂z/∂x| (B,))``;
    ``rev=True`` runs ``model.inverse``. Conditions (``dims_c``, for conditional couplings)
    reach the model as ``context``: one condition as is, several concatenated along dim 1.
    The log-det is always computed (the fused op produces it anyway), also for ``jac=False``.
    """

    def __init__(self, dims_in, dims_c=None, model=None):
        super().__init__(dims_in, dims_c)
        if model is None:
            raise TypeError("RGFlowBlock needs the module to run: inn.append(RGFlowBlock, model=model)")
        _check_flow_module(model, "RGFlowBlock")
        shape = _single_input(dims_in, "RGFlowBlock")
        if hasattr(model, "channels") and hasattr(model, "image_size"):
            expected = (model.channels, model.image_size, model.image_size)
            if shape != expected:
                raise ValueError(f"dims_in {[shape]} does not match the model's image shape {[expected]}")
        if self.dims_c and not _takes_context(model):
            raise ValueError(
                f"conditions (dims_c={self.dims_c}) were given but {type(model).__name__} takes "
                f"no context; wrap a conditional CheckerboardAffineCoupling instead"
            )
        self.model = model

    def forward(self, x_or_z, c=None, rev=False, jac=True):
        x = _one_tensor(x_or_z, "RGFlowBlock")
        out, log_jac_det = _apply(self.model, x, inverse=rev, context=_conditions(c))
        return (out,), log_jac_det

    def output_dims(self, input_dims):
        _single_input(input_dims, "RGFlowBlock")
        return list(input_dims)


class _WithConditions(nn.Module):
    """A FrEIA subnet fed the masked image with the conditions appended along channels."""

    def __init__(self, subnet):
        super().__init__()
        self.subnet = subnet

    def forward(self, v, context=None):
        return self.subnet(v if context is None else torch.cat([v, context], dim=1))


class CheckerboardCouplingBlock(InvertibleModule):
    """RealNVP's checkerboard affine coupling in FrEIA's conventions, on the fused op.

    Two :class:`rgflow_fast.nn.CheckerboardAffineCoupling` steps on the whole image
    ``(C, L, L)`` (``L`` even): the first transforms the pixels with ``i+j`` odd given the
    even ones, the second the even given the odd, each with its own subnet
    ``subnet_constructor(C + C_c, 2C)`` (FrEIA's convention: input, output channels), where
    ``C_c`` is the total channels of the conditions. A subnet maps ``(B, C + C_c, L, L) ->
    (B, 2C, L, L)`` (e.g. a conv net): its input is the image with the pixels being
    transformed set to zero, conditions ``dims_c = [(C_c_i, L, L), ...]`` appended along
    channels; its output is ``s`` (first ``C`` channels, pre-tanh) and ``t``. The step is
    ``y = x·exp(tanh s) + t``, log-det ``Σ tanh s``: FrEIA's ``clamp=1.0,
    clamp_activation="TANH"``.
    """

    def __init__(self, dims_in, dims_c=None, subnet_constructor=None):
        super().__init__(dims_in, dims_c)
        if subnet_constructor is None:
            raise TypeError(
                "CheckerboardCouplingBlock needs subnet_constructor(channels_in, channels_out) "
                "returning an nn.Module, as FrEIA's coupling blocks do"
            )
        C, L, _ = _single_input(dims_in, "CheckerboardCouplingBlock")
        if L % 2:
            raise ValueError(f"CheckerboardCouplingBlock needs an even image side; got dims_in={list(dims_in)}")
        for shape in self.dims_c:
            if tuple(shape[1:]) != (L, L):
                raise ValueError(
                    f"conditions must be images of the input's size (C_c, {L}, {L}) to be appended "
                    f"along channels; got dims_c={self.dims_c}"
                )
        in_channels = C + sum(shape[0] for shape in self.dims_c)
        self.couplings = nn.ModuleList(
            CheckerboardAffineCoupling(_WithConditions(subnet_constructor(in_channels, 2 * C)), parity)
            for parity in (0, 1)
        )

    def forward(self, x_or_z, c=None, rev=False, jac=True):
        x = _one_tensor(x_or_z, "CheckerboardCouplingBlock")
        context = _conditions(c)
        log_jac_det = 0
        for coupling in reversed(self.couplings) if rev else self.couplings:
            x, step = coupling.inverse(x, context) if rev else coupling(x, context)
            log_jac_det = log_jac_det + step
        return (x,), log_jac_det

    def output_dims(self, input_dims):
        _single_input(input_dims, "CheckerboardCouplingBlock")
        return list(input_dims)
