"""Latent priors with temperature: Laplace (scale ``b = T/√2``, unit variance at T=1) and
Gaussian (std ``T``). A temperature is one float, or one value per RG level ("mixed
temperature"): latent pixel ``(i, j)`` belongs to the largest level ``h <= n-1`` with both
``i`` and ``j`` multiples of ``2**h`` (:func:`rgflow_fast.geometry.latent_levels`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .geometry import latent_levels, num_levels

__all__ = ["Prior", "PRIORS"]

# distribution scale per unit temperature
PRIORS = {"laplace": 1 / math.sqrt(2), "gaussian": 1.0}


class Prior(nn.Module):
    """Factorised prior over latents ``z (B, C, L, L)``.

    The buffer ``scale (n_levels,)`` holds the distribution's scale per level (Laplace ``b``,
    Gaussian std); ``temperature`` is that over the unit-temperature scale.
    """

    def __init__(self, kind: str, channels: int, image_size: int, kernel_size: int, temperature=1.0):
        super().__init__()
        if kind not in PRIORS:
            raise ValueError(f"unknown prior {kind!r}; choose one of {sorted(PRIORS)}")
        self.kind = kind
        self.channels = channels
        self.image_size = image_size
        self.n_levels = num_levels(image_size, kernel_size)
        self.register_buffer("levels", latent_levels(image_size, kernel_size), persistent=False)
        self.register_buffer("scale", self._scales(temperature).to(torch.get_default_dtype()))

    def _scales(self, temperature) -> torch.Tensor:
        """Per-level scales (float64 on CPU) for a float or per-level temperature."""
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.tolist()
        if isinstance(temperature, Sequence) and not isinstance(temperature, str):
            values = [float(t) for t in temperature]
            if len(values) != self.n_levels:
                raise ValueError(
                    f"a per-level temperature needs one value per RG level ({self.n_levels}); "
                    f"got {len(values)}: {values}"
                )
        else:
            values = [float(temperature)] * self.n_levels
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"temperatures must be finite and > 0; got {values}")
        return torch.tensor(values, dtype=torch.float64) * PRIORS[self.kind]

    @property
    def temperature(self) -> list[float]:
        """Temperature of each RG level."""
        return (self.scale.double() / PRIORS[self.kind]).tolist()

    def set_temperature(self, temperature) -> None:
        self.scale.copy_(self._scales(temperature))

    def scale_map(self, temperature=None) -> torch.Tensor:
        """Distribution scale of every latent pixel, ``(L, L)``."""
        scale = self.scale if temperature is None else self._scales(temperature).to(self.scale)
        return scale[self.levels]

    def _check(self, z):
        expected = (self.channels, self.image_size, self.image_size)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, expected))}); got {tuple(z.shape)}")

    def log_prob(self, z, temperature=None) -> torch.Tensor:
        """``log p(z)`` summed over all latents, ``(B,)``."""
        self._check(z)
        b = self.scale_map(temperature).to(z.dtype)
        if self.kind == "laplace":
            out = -z.abs() / b - torch.log(2 * b)
        else:
            out = -0.5 * (z / b) ** 2 - torch.log(b) - 0.5 * math.log(2 * math.pi)
        return out.flatten(1).sum(dim=1)

    def sample(self, n: int, temperature=None, generator=None) -> torch.Tensor:
        """``n`` latents ``(n, C, L, L)`` in the dtype and device of the ``scale`` buffer."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"number of samples must be an int >= 0; got {n!r}")
        b = self.scale_map(temperature)
        shape = (n, self.channels, self.image_size, self.image_size)
        if self.kind == "laplace":
            # inverse CDF; uniform_ is on [a, b), so start at eps-1 to keep log1p finite
            eps = torch.finfo(b.dtype).eps
            u = b.new_empty(shape).uniform_(eps - 1, 1, generator=generator)
            return b * u.sign() * torch.log1p(-u.abs())
        return b * b.new_empty(shape).normal_(generator=generator)
