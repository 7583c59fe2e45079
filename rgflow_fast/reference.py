"""Backend ``"torch"``: the pure-PyTorch reference of the RG ops.

Written the way the original RG-Flow code computes them (fancy-index gather, clone +
index-put scatter, masks as multiplications), so that every fast backend can be
checked against it; autograd differentiates it. The ops are those of the backend contract
(:mod:`rgflow_fast.backends`); inputs are validated by :mod:`rgflow_fast.functional`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .geometry import checkerboard, patch_indices
from .nets import net_layout

__all__ = [
    "rg_gather",
    "rg_scatter",
    "rg_coupling",
    "coupling_on_patches",
    "coupling_inverse_on_patches",
    "rg_coupling_layer",
    "checkerboard",  # lives in rgflow_fast.geometry; importable from here as before
]

NAME = "torch"


def unavailable_reason():
    return None


def unsupported_reason(x: torch.Tensor):
    return None


def rg_gather(x, kernel_size, dilation, offset):
    """``x (B, C, L, L) -> (B*P, C, k, k)``, ``patches[b*P + p, c, a, bb] = x[b, c, rows[p, a*k+bb],
    cols[p, a*k+bb]]`` (:func:`rgflow_fast.geometry.patch_indices`)."""
    B, C, L, _ = x.shape
    rows, cols = patch_indices(L, kernel_size, dilation, offset, x.device)
    u = x[:, :, rows, cols]  # (B, C, P, k*k)
    return u.permute(0, 2, 1, 3).reshape(-1, C, kernel_size, kernel_size)


def rg_scatter(patches, x, kernel_size, dilation, offset):
    """A copy of ``x (B, C, L, L)`` with ``patches (B*P, C, k, k)`` written where
    :func:`rg_gather` reads them."""
    B, C, L, _ = x.shape
    rows, cols = patch_indices(L, kernel_size, dilation, offset, x.device)
    u = patches.reshape(B, -1, C, kernel_size * kernel_size).permute(0, 2, 1, 3)
    out = x.clone()
    out[:, :, rows, cols] = u
    return out


def coupling_on_patches(u, s, t, parity):
    """One checkerboard step on patches ``u (N, C, k, k)``, with ``m = checkerboard(k, parity)``:
    ``u' = (1 - m)·u + m·(u·exp(m·tanh s) + m·t)``; returns ``(u', Σ m·tanh s)`` per row ``(N,)``."""
    transformed = checkerboard(u.shape[-1], parity, u)
    s = transformed * torch.tanh(s)
    t = transformed * t
    out = (1 - transformed) * u + transformed * (u * torch.exp(s) + t)
    return out, s.sum(dim=(1, 2, 3))


def coupling_inverse_on_patches(v, s, t, parity):
    """Inverse of :func:`coupling_on_patches`: ``u = (1 - m)·v + m·(v - m·t)·exp(-m·tanh s)``;
    returns ``(u, -Σ m·tanh s)`` per row."""
    transformed = checkerboard(v.shape[-1], parity, v)
    s = transformed * torch.tanh(s)
    t = transformed * t
    out = (1 - transformed) * v + transformed * (v - t) * torch.exp(-s)
    return out, -s.sum(dim=(1, 2, 3))


def rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
    """One coupling step on the image: gather, :func:`coupling_on_patches` (``inverse``:
    :func:`coupling_inverse_on_patches`), scatter. Returns ``(y (B, C, L, L), ldj (B,), v)``,
    ``ldj`` the rows' log-dets summed per image and ``v = checkerboard(parity)·rg_gather(y)``
    if ``emit``, else an empty tensor."""
    couple = coupling_inverse_on_patches if inverse else coupling_on_patches
    u, rows = couple(rg_gather(x, kernel_size, dilation, offset), s, t, parity)
    y = rg_scatter(u, x, kernel_size, dilation, offset)
    # rg_gather(y) is u again: gather and scatter are bijections of the same pixels
    v = checkerboard(kernel_size, parity, u) * u if emit else x.new_empty(0)
    return y, rows.reshape(x.shape[0], -1).sum(dim=1), v


def _net(v, params, n_res, n_mlp):
    """``σ ⊙ R(v)`` from a net's flat parameters, op for op as
    :class:`rgflow_fast.nets.ResidualMLP` computes it."""
    it = iter(params)
    for _ in range(n_res):
        h = v
        for _ in range(n_mlp + 1):
            beta, V, g, b = next(it), next(it), next(it), next(it)
            h = h * torch.sigmoid(beta * h)
            h = F.linear(h, V * (g / V.norm(dim=1, keepdim=True)), b)
        v = (v + h) / math.sqrt(2)
    return next(it) * v


def rg_coupling_layer(u, ldj, params, n_mlp, inverse, recompute, precision="fp32"):
    """One RNVP coupling layer on patches ``u (N, C, k, k)`` (the op family and its parameter
    layout: :mod:`rgflow_fast.coupling_layer`): the original code's nets and coupling, step by
    step, each step's rows summed per image into ``ldj (B,)``. ``recompute`` and
    ``precision`` are accepted for the common signature (autograd stores what it needs; the
    reference computes in ``u``'s dtype)."""
    per_net = len(params) // 2
    n_res = net_layout(len(params), n_mlp)
    s_params, t_params = params[:per_net], params[per_net:]
    k = u.shape[-1]
    couple = coupling_inverse_on_patches if inverse else coupling_on_patches
    for parity in ((1, 0) if inverse else (0, 1)):
        v = (1 - checkerboard(k, parity, u)) * u
        flat = v.reshape(v.shape[0], -1)
        s = _net(flat, s_params, n_res, n_mlp).view_as(v)
        t = _net(flat, t_params, n_res, n_mlp).view_as(v)
        u, rows = couple(u, s, t, parity)
        ldj = ldj + rows.reshape(ldj.shape[0], -1).sum(dim=1)
    return u, ldj
