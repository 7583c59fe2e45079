"""normflows adapters (``pip install "rgflow-fast[normflows]"``).

normflows' conventions: a ``normflows.flows.Flow``'s ``forward(z) -> (x, log|det ∂x/∂z|)``
runs latent → data (the sampling direction), ``inverse(x) -> (z, log|det ∂z/∂x|)`` data →
latent; ``NormalizingFlow(q0, flows)`` applies ``flows`` in list order from the latent side
and computes ``log_prob(x) = Σ inverse log-dets + q0.log_prob(z)``. Ours is the other way
round (``forward`` is data → latent), so :class:`RGFlowLayer` swaps the two.
``ConditionalNormalizingFlow`` passes ``context=`` to every flow and to ``q0``.

- :class:`RGFlowLayer` wraps an RG-Flow model, one of its blocks, or a
  :class:`rgflow_fast.nn.CheckerboardAffineCoupling` as a ``Flow``.
- :class:`RGFlowPrior` is an RG-Flow prior (Laplace or Gaussian, one temperature per RG
  level) as a normflows base distribution.
"""
from __future__ import annotations

from . import _apply, _check_flow_module, _prior_of, _require

nf = _require("normflows")

__all__ = ["RGFlowLayer", "RGFlowPrior"]


class RGFlowLayer(nf.flows.Flow):
    """``model`` as a normflows ``Flow``: ``forward(z) = model.inverse(z)`` (latent → data),
    ``inverse(x) = model(x)`` (data → latent), each returning ``(out, log|det ∂out/∂in| (B,))``.

    ``model``: an :class:`rgflow_fast.RGFlow`, one block ``model.blocks[i]``, or an
    :class:`rgflow_fast.nn.CheckerboardAffineCoupling` (the only one that takes ``context``).
    Images are ``(B, C, L, L)``.
    """

    def __init__(self, model):
        super().__init__()
        self.model = _check_flow_module(model, "RGFlowLayer")

    def forward(self, z, context=None):
        return _apply(self.model, z, inverse=True, context=context)

    def inverse(self, x, context=None):
        return _apply(self.model, x, inverse=False, context=context)


class RGFlowPrior(nf.distributions.BaseDistribution):
    """An RG-Flow prior as a normflows base distribution over latents ``(B, C, L, L)``.

    ``prior``: an :class:`rgflow_fast.RGFlow` (its ``.prior`` is used) or its prior;
    ``temperature``: ``None`` (the prior's own), a float, or one value per RG level.
    ``forward(num_samples) -> (z, log_prob (num_samples,))``; ``log_prob(z) -> (B,)``.
    The prior is unconditional: a ``context`` is accepted and ignored.
    """

    def __init__(self, prior, temperature=None):
        super().__init__()
        self.prior = _prior_of(prior, "RGFlowPrior")
        self.temperature = temperature

    def forward(self, num_samples=1, context=None):
        z = self.prior.sample(num_samples, self.temperature)
        return z, self.prior.log_prob(z, self.temperature)

    def log_prob(self, z, context=None):
        return self.prior.log_prob(z, self.temperature)
