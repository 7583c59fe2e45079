"""Layers built on the fused RG ops, for use in any flow.

:class:`CheckerboardAffineCoupling` is RG-Flow's coupling step — a checkerboard-masked,
tanh-clamped affine coupling with its log-det — around a conditioner network you bring: an
MLP on RG patches, or a conv net on the whole image (RealNVP-style), optionally
conditioned on a context tensor. It runs on :func:`rgflow_fast.functional.rg_coupling`,
so it uses whichever backend :func:`rgflow_fast.use_backend` selects.
"""
from __future__ import annotations

import torch
from torch import nn

from . import functional as rgf
from .geometry import check_patch_geometry, checkerboard

__all__ = ["CheckerboardAffineCoupling"]


class CheckerboardAffineCoupling(nn.Module):
    """Checkerboard affine coupling ``y = x·exp(tanh s) + t`` on half the positions.

    Direction: ``forward`` is data → latent, ``forward(x, context=None) -> (y, ldj (B,))``
    with ``ldj = log|det ∂y/∂x| = Σ tanh s`` over the transformed positions;
    ``inverse(y, context=None) -> (x, -ldj)``.

    **Geometry.** With ``kernel_size=None`` (default) the whole image ``(B, C, L, L)`` is one
    patch (``L`` must be even): ``parity=0`` transforms the pixels with ``i+j`` odd,
    ``parity=1`` those with ``i+j`` even. With ``kernel_size=k`` (and ``dilation``,
    ``offset``) the coupling acts on the RG patches of
    :func:`rgflow_fast.functional.rg_gather`, ``P = (L/(k·d))²`` per image, and the parity
    refers to ``a+b`` inside each patch; pixels outside every patch are unchanged.

    **The network.** ``net(v)`` — or ``net(v, context)`` when a context is given — receives
    the masked input ``v``: the kept positions, the transformed ones set to zero.

    - whole image: ``v (B, C, L, L)``; patches: ``v (B·P, C, k, k)``, row ``b·P + p``.
    - it returns ``s`` (pre-tanh) and ``t`` of ``v``'s shape, either as a pair ``(s, t)`` or
      as one tensor with ``2C`` channels, ``s = out[:, :C]``, ``t = out[:, C:]``. Values at
      the kept positions are ignored.
    - ``context``: any tensor with the batch ``B`` first (e.g. a global latent ``(B, D)``,
      or a feature map). On patches each row gets its image's context:
      ``context.repeat_interleave(P, dim=0)``, shape ``(B·P, ...)``.

    Two couplings of parity 0 and 1 transform every pixel once; RG-Flow's layer ``j`` is
    exactly that pair with the same nets.
    """

    def __init__(self, net, parity: int, kernel_size: int | None = None, dilation: int = 1, offset: int = 0):
        super().__init__()
        if not callable(net):
            raise TypeError(
                f"net must be a callable (an nn.Module) returning (s, t) or one tensor with 2C "
                f"channels; got {type(net).__name__}"
            )
        rgf.check_parity(parity)
        if kernel_size is None:
            if dilation != 1 or offset != 0:
                raise ValueError(
                    f"dilation={dilation} and offset={offset} only apply to patches: pass "
                    f"kernel_size=k too, or leave them at 1 and 0 to couple the whole image"
                )
        else:
            # side 0 is a multiple of every stride, so this checks k, d and offset alone
            check_patch_geometry(0, kernel_size, dilation, offset)
        self.net = net
        self.parity = parity
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.offset = offset

    def _geometry(self, x):
        if self.kernel_size is not None:
            return self.kernel_size, self.dilation, self.offset
        L = x.shape[-1]
        if L % 2:
            raise ValueError(
                f"a whole-image checkerboard coupling needs an even image side; got "
                f"{tuple(x.shape)}: pad or crop the image, or couple patches with kernel_size=k"
            )
        return L, 1, 0

    def _params(self, x, geometry, context):
        """Run the net on the masked input; returns ``(s, t)`` in gather order."""
        k = geometry[0]
        u = x if self.kernel_size is None else rgf.rg_gather(x, *geometry)
        v = u * (1 - checkerboard(k, self.parity, u))
        if context is None:
            out = self.net(v)
        else:
            if not isinstance(context, torch.Tensor):
                raise TypeError(f"context must be a torch.Tensor; got {type(context).__name__}")
            if context.dim() == 0 or context.shape[0] != x.shape[0]:
                raise ValueError(
                    f"context must have the batch size first, (B, ...) with B = {x.shape[0]}; "
                    f"got {tuple(context.shape)}"
                )
            patches = u.shape[0] // x.shape[0]
            out = self.net(v, context if patches == 1 else context.repeat_interleave(patches, dim=0))
        return self._split(out, v)

    def _split(self, out, v):
        C = v.shape[1]
        if isinstance(out, torch.Tensor) and out.dim() == v.dim() and out.shape[1] == 2 * C:
            s, t = out[:, :C], out[:, C:]
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            s, t = out
        else:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"net must return (s, t), each of shape {tuple(v.shape)}, or one tensor of shape "
                f"{(v.shape[0], 2 * C, *v.shape[2:])} (s = out[:, :C], t = out[:, C:]); got {got}"
            )
        for name, p in (("s", s), ("t", t)):
            if not isinstance(p, torch.Tensor) or p.shape != v.shape:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"net's {name} must have the input's shape {tuple(v.shape)}; got {got}")
        return s, t

    def forward(self, x, context=None):
        """``x (B, C, L, L) -> (y, ldj (B,))``; ``ldj = Σ tanh s`` over transformed positions."""
        rgf.check_image(x)
        geometry = self._geometry(x)
        return rgf.rg_coupling(x, *self._params(x, geometry, context), *geometry, self.parity)

    def inverse(self, y, context=None):
        """``y (B, C, L, L) -> (x, -ldj (B,))``, ``x = (y - t)·exp(-tanh s)`` where transformed."""
        rgf.check_image(y, "y")
        geometry = self._geometry(y)
        # the kept positions of y equal those of x, so the net sees the same input as forward
        return rgf.rg_coupling_inverse(y, *self._params(y, geometry, context), *geometry, self.parity)

    def extra_repr(self) -> str:
        if self.kernel_size is None:
            return f"parity={self.parity}, whole image"
        return f"parity={self.parity}, kernel_size={self.kernel_size}, dilation={self.dilation}, offset={self.offset}"
