"""The data transform of RG-Flow and bits per dimension.

Images in ``[0, 1]`` (8-bit values ``v/255``) are dequantised ``x ← (255·x + u)/256``,
``u ~ U[0, 1)``, restricted ``x ← 0.05 + 0.9·x`` and mapped to logit space
``y = logit(x)``. The log-det of ``x ↦ y`` (the restriction included) per element is
``softplus(y) + softplus(-y) - softplus(-log 9)``, since ``softplus(-log 9) = log(1/0.9)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ALPHA", "dequantize", "logit_transform", "inverse_logit_transform", "to_pixels", "bits_per_dim", "preprocess",
]

ALPHA = 0.05  # x ← ALPHA + (1 - 2·ALPHA)·x keeps the logit finite
_SOFTPLUS_MINUS_LOG9 = math.log1p(1 / 9)  # = softplus(-log 9) = -log(1 - 2·ALPHA)


def dequantize(x: torch.Tensor, generator=None) -> torch.Tensor:
    """``x ← (255·x + u)/256`` with ``u ~ U[0, 1)``: 8-bit images to continuous ``[0, 1)``."""
    u = torch.empty_like(x).uniform_(0, 1, generator=generator)
    return (255 * x + u) / 256


def logit_transform(x: torch.Tensor):
    """``x (B, C, L, L)`` in ``[0, 1]`` → ``(y, ldj (B,))`` with ``y = logit(0.05 + 0.9·x)``."""
    y = torch.logit(ALPHA + (1 - 2 * ALPHA) * x)
    ldj = F.softplus(y) + F.softplus(-y) - _SOFTPLUS_MINUS_LOG9
    return y, ldj.flatten(1).sum(dim=1)  # flatten, not reshape(B, -1): B may be 0


def inverse_logit_transform(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`logit_transform`: ``x = (sigmoid(y) - 0.05)/0.9`` (not clamped)."""
    return (torch.sigmoid(y) - ALPHA) / (1 - 2 * ALPHA)


def to_pixels(y: torch.Tensor) -> torch.Tensor:
    """Logit-space images (what :meth:`RGFlow.sample` and :meth:`RGFlow.inverse` return) →
    pixels in ``[0, 1]``: :func:`inverse_logit_transform`, clamped.

    A sample may fall outside the logit range of the data (``x`` beyond ``[0, 1]`` before
    the clamp); the clamp maps it to the nearest valid pixel, as an image writer would::

        pixels = rf.transforms.to_pixels(model.sample(16))   # (16, C, L, L) in [0, 1]
    """
    return inverse_logit_transform(y).clamp(0, 1)


def preprocess(x: torch.Tensor, generator=None):
    """Dequantise and map to logit space: ``x`` in ``[0, 1]`` → ``(y, ldj_data (B,))``."""
    return logit_transform(dequantize(x, generator))


def bits_per_dim(log_prob: torch.Tensor, ldj_data: torch.Tensor, num_dims: int) -> torch.Tensor:
    """``(-(log_prob + ldj_data)/num_dims + log 256)/log 2``, per sample.

    ``log_prob`` is the flow's log-likelihood in logit space, ``ldj_data`` the data
    transform's log-det, ``num_dims = C·L²``; the ``log 256`` accounts for the 8-bit
    quantisation bins of width 1/256.
    """
    return (-(log_prob + ldj_data) / num_dims + math.log(256)) / math.log(2)
