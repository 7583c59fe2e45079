"""The public RG ops. Each validates its inputs and runs on the backend chosen by
:func:`rgflow_fast.use_backend` (the reference is :mod:`rgflow_fast.reference`; the contract
every backend implements is in :mod:`rgflow_fast.backends`).

Shapes: image ``x (B, C, L, L)``; a block with kernel ``k``, dilation ``d`` has
``P = (L/(k*d))**2`` patches per image, stacked as ``(B*P, C, k, k)`` with row ``b*P + p``.
All ops are differentiable in every tensor input. :func:`rg_coupling_layer`, one whole
coupling layer (nets included) on the patch tensor, is its own op family
(:mod:`rgflow_fast.coupling_layer`) and is re-exported here.

The validators (:func:`check_image`, :func:`check_patches`, :func:`check_parity`) are public
for layers built on these ops.
"""
from __future__ import annotations

import torch

from . import backends
from .coupling_layer import rg_coupling_layer
from .geometry import check_patch_geometry, num_patches

__all__ = [
    "rg_gather",
    "rg_scatter",
    "rg_coupling",
    "rg_coupling_inverse",
    "rg_coupling_step",
    "rg_coupling_layer",
    "check_image",
    "check_patches",
    "check_parity",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_image(x, name="x"):
    """Raise unless ``x`` is a floating-point tensor of shape ``(B, C, L, L)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, L, L); got {tuple(x.shape)}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must be square (B, C, L, L); got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor; got {x.dtype}")


def check_patches(p, x, kernel_size, dilation, offset, name):
    """Raise unless the block geometry is valid for image ``x`` and ``p`` is its patch tensor
    ``(B*P, C, k, k)`` with ``x``'s dtype and device."""
    check_patch_geometry(x.shape[-1], kernel_size, dilation, offset)
    P = num_patches(x.shape[-1], kernel_size, dilation)
    expected = (x.shape[0] * P, x.shape[1], kernel_size, kernel_size)
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(p).__name__}")
    if tuple(p.shape) != expected:
        raise ValueError(
            f"{name} must have shape (B*P, C, k, k) = {expected} for an image of shape "
            f"{tuple(x.shape)} (P = (L/(k*d))**2 = {P}); got {tuple(p.shape)}"
        )
    if p.dtype != x.dtype or p.device != x.device:
        raise ValueError(
            f"{name} ({p.dtype}, {p.device}) must match the image's dtype and device "
            f"({x.dtype}, {x.device})"
        )


def check_parity(parity):
    """Raise unless ``parity`` is 0 or 1."""
    if parity not in (0, 1) or isinstance(parity, bool):
        raise ValueError(f"parity must be 0 (transform a+b odd) or 1 (a+b even); got {parity!r}")


def rg_gather(x, kernel_size, dilation, offset):
    """Gather the RG patches of one block.

    ``x (B, C, L, L) -> patches (B*P, C, k, k)`` with
    ``patches[b*P + pi*m + pj, c, a, bb] = x[b, c, (pi*k*d + a*d + offset) % L, (pj*k*d + bb*d + offset) % L]``.
    """
    check_image(x)
    check_patch_geometry(x.shape[-1], kernel_size, dilation, offset)
    return backends.resolve(x).rg_gather(x, kernel_size, dilation, offset)


def rg_scatter(patches, x, kernel_size, dilation, offset):
    """Write patches back into a copy of ``x``: the inverse of :func:`rg_gather`.

    ``patches (B*P, C, k, k), x (B, C, L, L) -> (B, C, L, L)``; pixels that no patch
    touches keep their value from ``x``.
    """
    check_image(x)
    check_patches(patches, x, kernel_size, dilation, offset, "patches")
    return backends.resolve(x).rg_scatter(patches, x, kernel_size, dilation, offset)


def _coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit, name):
    """Validate, then one step on the backend: ``(y, ldj, v)`` (backend contract)."""
    check_image(x, name)
    check_patches(s, x, kernel_size, dilation, offset, "s")
    check_patches(t, x, kernel_size, dilation, offset, "t")
    check_parity(parity)
    return backends.resolve(x).rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit)


def rg_coupling(x, s, t, kernel_size, dilation, offset, parity):
    """Fused gather + checkerboard tanh-clamped affine coupling + log-det.

    ``x (B, C, L, L)``; ``s``, ``t (B*P, C, k, k)`` in gather order (``s`` pre-tanh).
    Parity 0 transforms the patch positions with ``a+b`` odd, parity 1 those with ``a+b``
    even. Returns ``y (B, C, L, L)`` with ``y = x*exp(tanh s) + t`` at transformed
    positions (all other pixels unchanged) and ``ldj (B,) = Σ tanh s`` over them.
    """
    y, ldj, _ = _coupling(x, s, t, kernel_size, dilation, offset, parity, False, False, "x")
    return y, ldj


def rg_coupling_inverse(y, s, t, kernel_size, dilation, offset, parity):
    """Inverse of :func:`rg_coupling`: ``x = (y - t)*exp(-tanh s)`` at transformed
    positions; returns ``(x (B, C, L, L), inv_ldj (B,) = -Σ tanh s)``."""
    x, inv_ldj, _ = _coupling(y, s, t, kernel_size, dilation, offset, parity, True, False, "y")
    return x, inv_ldj


def rg_coupling_step(x, s, t, kernel_size, dilation, offset, parity, inverse=False):
    """One step of an RNVP stack on the image, plus the masked patches the next step's nets read.

    Returns ``(y, ldj, v)``: ``(y, ldj)`` as :func:`rg_coupling` (``inverse=True``: as
    :func:`rg_coupling_inverse`) and ``v (B*P, C, k, k) = mask ⊙ rg_gather(y)``, where
    ``mask`` is this step's transformed half — the positions the next step (parity
    ``1 - parity``) keeps, so ``v`` is its net input.
    """
    if not isinstance(inverse, bool):
        raise TypeError(f"inverse must be a bool; got {inverse!r}")
    return _coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, True, "x")
