"""Backend ``"torch"``: the pure-PyTorch reference of the RG ops.

Written the way the original RG-Flow code computes them (fancy-index gather, clone +
index-put scatter, masks as multiplications), so that every fast backend can be
checked against it. Inputs are validated by :mod:`rgflow_fast.functional`.
"""
from __future__ import annotations

import torch

from .geometry import patch_indices

NAME = "torch"


def unavailable_reason():
    return None


def unsupported_reason(x: torch.Tensor):
    return None


def checkerboard(kernel_size: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """``(k, k)`` mask of the positions a step with ``parity`` transforms:
    ``a+b`` odd for parity 0 (the original's ``left`` step), even for parity 1."""
    a = torch.arange(kernel_size, device=like.device)
    odd = ((a[:, None] + a[None, :]) % 2).to(like.dtype)
    return odd if parity == 0 else 1 - odd


def rg_gather(x, kernel_size, dilation, offset):
    B, C, L, _ = x.shape
    rows, cols = patch_indices(L, kernel_size, dilation, offset, x.device)
    u = x[:, :, rows, cols]  # (B, C, P, k*k)
    return u.permute(0, 2, 1, 3).reshape(-1, C, kernel_size, kernel_size)


def rg_scatter(patches, x, kernel_size, dilation, offset):
    B, C, L, _ = x.shape
    rows, cols = patch_indices(L, kernel_size, dilation, offset, x.device)
    u = patches.reshape(B, -1, C, kernel_size * kernel_size).permute(0, 2, 1, 3)
    out = x.clone()
    out[:, :, rows, cols] = u
    return out


def coupling_on_patches(u, s, t, parity):
    """One checkerboard step on patches ``u (N, C, k, k)``: returns ``(u', Σ tanh s)`` per row."""
    transformed = checkerboard(u.shape[-1], parity, u)
    s = transformed * torch.tanh(s)
    t = transformed * t
    out = (1 - transformed) * u + transformed * (u * torch.exp(s) + t)
    return out, s.sum(dim=(1, 2, 3))


def coupling_inverse_on_patches(v, s, t, parity):
    """Inverse of :func:`coupling_on_patches`: returns ``(u, -Σ tanh s)`` per row."""
    transformed = checkerboard(v.shape[-1], parity, v)
    s = transformed * torch.tanh(s)
    t = transformed * t
    out = (1 - transformed) * v + transformed * (v - t) * torch.exp(-s)
    return out, -s.sum(dim=(1, 2, 3))


def _per_sample(ldj_rows, batch_size):
    return ldj_rows.reshape(batch_size, -1).sum(dim=1)


def rg_coupling(x, s, t, kernel_size, dilation, offset, parity):
    u = rg_gather(x, kernel_size, dilation, offset)
    u, ldj = coupling_on_patches(u, s, t, parity)
    return rg_scatter(u, x, kernel_size, dilation, offset), _per_sample(ldj, x.shape[0])


def rg_coupling_inverse(y, s, t, kernel_size, dilation, offset, parity):
    v = rg_gather(y, kernel_size, dilation, offset)
    v, inv_ldj = coupling_inverse_on_patches(v, s, t, parity)
    return rg_scatter(v, y, kernel_size, dilation, offset), _per_sample(inv_ldj, y.shape[0])


def rg_coupling_step(x, s, t, kernel_size, dilation, offset, parity, inverse):
    couple = rg_coupling_inverse if inverse else rg_coupling
    y, ldj = couple(x, s, t, kernel_size, dilation, offset, parity)
    v = rg_gather(y, kernel_size, dilation, offset)
    return y, ldj, checkerboard(kernel_size, parity, v) * v
