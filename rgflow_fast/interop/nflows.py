"""nflows adapters (``pip install "rgflow-fast[nflows]"``).

nflows' conventions: a ``nflows.transforms.Transform`` maps data → noise,
``forward(inputs, context=None) -> (outputs, logabsdet (B,))`` with ``logabsdet =
log|det ∂outputs/∂inputs|`` — the same direction as ours — and ``inverse`` maps noise →
data. ``nflows.flows.Flow(transform, distribution)`` computes ``log_prob(x, context) =
distribution.log_prob(z, context) + logabsdet`` and samples through ``transform.inverse``.

- :class:`RGFlowTransform` wraps an RG-Flow model, one of its blocks, or a
  :class:`rgflow_fast.nn.CheckerboardAffineCoupling` as a ``Transform``.
- :class:`RGFlowDistribution` is an RG-Flow prior (Laplace or Gaussian, one temperature per
  RG level) as an nflows ``Distribution``.

Contexts behave as in nflows' own classes: unconditional transforms (an ``RGFlow``, an RG
block, nflows' ``ActNorm``...) accept and ignore one, so they compose with conditional layers
inside a conditional ``Flow``; the prior ignores it except for the sample layout, as
``StandardNormal`` does.
"""
from __future__ import annotations

from . import _apply, _check_flow_module, _prior_of, _require, _takes_context

_require("nflows")
from nflows.distributions.base import Distribution  # noqa: E402
from nflows.transforms.base import Transform  # noqa: E402
from nflows.utils import torchutils  # noqa: E402

__all__ = ["RGFlowTransform", "RGFlowDistribution"]


class RGFlowTransform(Transform):
    """``model`` as an nflows ``Transform``: ``forward(x, context) = model(x)`` (data → noise),
    ``inverse(z, context) = model.inverse(z)``, each returning ``(out, logabsdet (B,))``.

    ``model``: an :class:`rgflow_fast.RGFlow`, one block ``model.blocks[i]``, or an
    :class:`rgflow_fast.nn.CheckerboardAffineCoupling` (the only one that uses ``context``).
    The others accept a context and ignore it, as nflows' unconditional transforms do, so
    they can sit in a conditional ``Flow``. Images are ``(B, C, L, L)``.
    """

    def __init__(self, model):
        super().__init__()
        self.model = _check_flow_module(model, "RGFlowTransform")
        self._conditional = _takes_context(model)

    def forward(self, inputs, context=None):
        return _apply(self.model, inputs, inverse=False, context=context if self._conditional else None)

    def inverse(self, inputs, context=None):
        return _apply(self.model, inputs, inverse=True, context=context if self._conditional else None)


class RGFlowDistribution(Distribution):
    """An RG-Flow prior as an nflows ``Distribution`` over latents ``(B, C, L, L)``.

    ``prior``: an :class:`rgflow_fast.RGFlow` (its ``.prior`` is used) or its prior;
    ``temperature``: ``None`` (the prior's own), a float, or one value per RG level.
    The prior is unconditional: a context only sets the layout, as for nflows'
    ``StandardNormal`` (``sample(n, context)`` is ``(context_size, n, C, L, L)``).
    ``mean()`` is the prior's mean, zeros ``(C, L, L)`` (``(context_size, C, L, L)`` with a
    context): Laplace and Gaussian priors are centred at 0 at every temperature.
    """

    def __init__(self, prior, temperature=None):
        super().__init__()
        self.prior = _prior_of(prior, "RGFlowDistribution")
        self.temperature = temperature

    def _log_prob(self, inputs, context):
        return self.prior.log_prob(inputs, self.temperature)

    def _sample(self, num_samples, context):
        if context is None:
            return self.prior.sample(num_samples, self.temperature)
        samples = self.prior.sample(context.shape[0] * num_samples, self.temperature)
        return torchutils.split_leading_dim(samples, [context.shape[0], num_samples])

    def _mean(self, context):
        shape = (self.prior.channels, self.prior.image_size, self.prior.image_size)
        if context is None:
            return self.prior.scale.new_zeros(shape)
        return self.prior.scale.new_zeros(context.shape[0], *shape)
