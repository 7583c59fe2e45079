"""Geometry of the RG blocks: levels, dilations, strides, offsets, patch indices and the
checkerboard masks of the coupling steps.

An image of side ``L = k * 2**(n-1)`` has ``n`` RG levels. Level ``h`` uses dilation
``d = 2**h`` and stride ``k*d``; it has two blocks, offset ``0`` then ``k*d/2``. A block
cuts the image into ``P = m*m`` patches (``m = L/(k*d)``); patch ``p = pi*m + pj``,
element ``(a, b)`` sits at row ``(pi*k*d + a*d + offset) mod L`` and column
``(pj*k*d + b*d + offset) mod L`` (periodic wrap). A coupling step with ``parity`` 0
transforms the patch elements with ``a+b`` odd, parity 1 those with ``a+b`` even.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "BlockSpec",
    "num_levels",
    "block_specs",
    "check_patch_geometry",
    "blocks_per_side",
    "num_patches",
    "patch_indices",
    "checkerboard",
    "latent_levels",
]


@dataclass(frozen=True)
class BlockSpec:
    """One RG block: ``index`` in forward order, its ``level`` h, ``dilation`` 2**h,
    ``offset`` (0 or k*d/2) and ``blocks_per_side`` m = L/(k*d)."""

    index: int
    level: int
    kernel_size: int
    dilation: int
    offset: int
    blocks_per_side: int

    @property
    def num_patches(self) -> int:
        """Patches per image ``P = m*m``."""
        return self.blocks_per_side**2


def _check_kernel_size(kernel_size) -> None:
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
        raise TypeError(f"kernel_size must be an int; got {kernel_size!r}")
    if kernel_size < 2 or kernel_size % 2:
        raise ValueError(
            f"kernel_size must be even and >= 2 (the checkerboard and the half-stride "
            f"offset need it); got {kernel_size}"
        )


def num_levels(image_size: int, kernel_size: int) -> int:
    """Number of RG levels ``n`` with ``image_size == kernel_size * 2**(n-1)``."""
    _check_kernel_size(kernel_size)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int; got {image_size!r}")
    ratio, rem = divmod(image_size, kernel_size)
    if rem or ratio & (ratio - 1):
        valid = ", ".join(str(kernel_size * 2**i) for i in range(6))
        raise ValueError(
            f"image_size must be kernel_size * 2**(levels-1) (so kernel_size must divide "
            f"image_size / 2**(levels-1) exactly); got image_size={image_size}, "
            f"kernel_size={kernel_size}. Valid sizes for this kernel: {valid}, ..."
        )
    return ratio.bit_length()


def block_specs(image_size: int, kernel_size: int) -> list[BlockSpec]:
    """All blocks of the flow in forward order (level 0 offset 0, level 0 offset k/2, ...)."""
    specs = []
    for h in range(num_levels(image_size, kernel_size)):
        d = 2**h
        m = blocks_per_side(image_size, kernel_size, d)
        for offset in (0, kernel_size * d // 2):
            specs.append(BlockSpec(len(specs), h, kernel_size, d, offset, m))
    return specs


def blocks_per_side(image_size: int, kernel_size: int, dilation: int) -> int:
    """Patches per side ``m = L/(k*d)`` of a block (of a geometry already checked with
    :func:`check_patch_geometry`)."""
    return image_size // (kernel_size * dilation)


def num_patches(image_size: int, kernel_size: int, dilation: int) -> int:
    """Patches per image ``P = m*m = (L/(k*d))**2`` of a block (of a checked geometry): the
    patch tensor of a batch of ``B`` images has ``B*P`` rows."""
    return blocks_per_side(image_size, kernel_size, dilation) ** 2


def check_patch_geometry(image_size: int, kernel_size: int, dilation: int, offset: int) -> int:
    """Validate one block's geometry; returns blocks per side ``m``. Errors say which
    argument is wrong and what it must be."""
    _check_kernel_size(kernel_size)
    for name, value in (("dilation", dilation), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int; got {value!r}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1; got {dilation}")
    if image_size % (kernel_size * dilation):
        raise ValueError(
            f"image size {image_size} must be a multiple of kernel_size*dilation = "
            f"{kernel_size}*{dilation} = {kernel_size * dilation}"
        )
    return blocks_per_side(image_size, kernel_size, dilation)


@functools.lru_cache(maxsize=256)
def _patch_indices_cpu(image_size, kernel_size, dilation, offset):
    m = check_patch_geometry(image_size, kernel_size, dilation, offset)
    stride = kernel_size * dilation
    start = torch.arange(m) * stride  # (m,)
    step = torch.arange(kernel_size) * dilation  # (k,)
    coord = (start[:, None] + step[None, :] + offset) % image_size  # (m, k)
    # rows (P, k*k): patch p = pi*m + pj, element a*k + b
    rows = coord[:, None, :, None].expand(m, m, kernel_size, kernel_size)
    cols = coord[None, :, None, :].expand(m, m, kernel_size, kernel_size)
    shape = (m * m, kernel_size * kernel_size)
    return rows.reshape(shape).contiguous(), cols.reshape(shape).contiguous()


_device_cache: dict = {}


def patch_indices(image_size, kernel_size, dilation, offset, device=None):
    """Row and column indices ``(P, k*k)`` (int64) of every patch element, on ``device``."""
    rows, cols = _patch_indices_cpu(image_size, kernel_size, dilation, offset)
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cpu":
        return rows, cols
    key = (image_size, kernel_size, dilation, offset, device)
    if key not in _device_cache:
        _device_cache[key] = (rows.to(device), cols.to(device))
    return _device_cache[key]


_masks: dict = {}


def checkerboard(kernel_size: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """``(k, k)`` mask, in ``like``'s dtype and on its device, of the positions a coupling step
    with ``parity`` transforms: ``mask[a, b] = 1`` where ``a+b`` is odd for parity 0 (the
    original's ``left`` step; its ``right`` step is parity 1, ``a+b`` even), else 0.

    The masks are built once per ``(k, parity, dtype, device)`` and shared: do not modify the
    returned tensor (``1 - mask`` is the kept half).
    """
    key = (kernel_size, parity, like.dtype, like.device)
    mask = _masks.get(key)
    if mask is None:
        # a normal tensor even when first asked for under inference_mode: autograd may save it
        with torch.inference_mode(False):
            a = torch.arange(kernel_size)
            odd = (a[:, None] + a[None, :]) % 2
            mask = (odd if parity == 0 else 1 - odd).to(like.dtype).to(like.device)
        if torch.compiler.is_compiling():
            return mask  # built in the traced graph: not a tensor to keep across calls
        _masks[key] = mask
    return mask


def latent_levels(image_size: int, kernel_size: int) -> torch.Tensor:
    """RG level of every latent position, ``(L, L)`` int64.

    Position ``(i, j)`` belongs to the largest ``h <= n-1`` with both ``i`` and ``j``
    multiples of ``2**h``.
    """
    n = num_levels(image_size, kernel_size)
    pos = torch.arange(image_size)
    both = pos[:, None] | pos[None, :]  # trailing zeros of (i|j) = min of both
    level = torch.full((image_size, image_size), n - 1, dtype=torch.int64)
    nonzero = both > 0
    tz = (both & -both).float().log2().round().long()
    level[nonzero] = tz[nonzero].clamp(max=n - 1)
    return level
