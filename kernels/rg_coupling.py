"""Triton kernels of the ``rg_coupling`` family: RG gather, scatter, the fused coupling step
(forward and inverse, optionally emitting the next step's net input) and its fused backward.

Geometry (see :mod:`rgflow_fast.geometry`): image ``(B, C, L, L)``, kernel ``k``, dilation
``d``, offset ``off``; ``m = L/(k·d)`` blocks per side, ``P = m²`` patches per image, stacked
as ``(B·P, C, k, k)`` with row ``b·P + pi·m + pj``. Pixel ``(i, j)`` belongs to a patch iff
``ri = (i - off) mod L`` and ``rj = (j - off) mod L`` are both multiples of ``d``; it is
element ``(a, bb) = ((ri/d) mod k, (rj/d) mod k)`` of patch ``(pi, pj) = (ri/d div k, rj/d div k)``.

Every kernel except the gather runs on a *pixel grid*: program ``(b·C + c, tile)`` handles
``BLOCK`` pixels of one image plane, works out from the pixel where it sits in the patch
tensors, and so reads and writes the image exactly once. No patch tensor of the image is
materialised and nothing is cloned. Arithmetic is in float32 (float64 for float64 inputs);
the per-sample log-det is reduced per program into a ``(B·C, tiles)`` buffer that is summed
afterwards (deterministic, no atomics).

Memory traffic, measured by counting every load and store the kernels issue (in Triton's
interpreter, float32, B=4, C=3, L=32, k=4), in units of one image pass ``E·w`` (``E =
B·C·L²`` elements, ``w`` bytes each). ``N = E/4^h`` is a level-``h`` block's patch elements.
``s``/``t`` are read only on the transformed half, but a k-wide patch row lies in one 32-byte
sector, so in DRAM traffic (sectors) they cost a full pass each:

=========================  ======================================  ==========================
kernel (one call)          reads                                   writes
=========================  ======================================  ==========================
coupling step, forward     x: E, s: N, t: N  (d=1: 2.00 elements,  y: E, v: N (d=1: 2.00)
                           3.00 sectors)
coupling step, backward    g_y: E, x, s, t, g_v: N each on the     g_x: E, g_s: N, g_t: N
                           transformed half (d=1: 3.00 elements,   (d=1: 3.00)
                           5.00 sectors)
gather                     x: N                                    patches: N
scatter                    patches: N, x: E - N                    out: E
=========================  ======================================  ==========================

Per step that is ``2E + 3N`` forward and ``3E + 5N`` backward (sector level): at level 0
(d=1, N=E) 5 and 8 image passes, 20 and 32 bytes per pixel in float32. Above level 0 the
image-wide copy dominates (measured forward sectors: d=2 2.75, d=4 2.19, d=8 2.05 passes),
so several steps on one block are cheaper on the gathered patch tensor, seen as a batch of
k×k images (geometry ``k, 1, 0``: 5N forward per step, plus one gather and one scatter per
block). The reference does one step as 19 eager kernels on the patch tensor, 24 passes of N at level 0,
plus a gather and a clone + scatter (9.3 passes) per block. A whole forward of a 32×32 model
with the paper's layer counts (8, 6, 4, 2) moves 172 image passes through these kernels
(87 read, 85 written, element count).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from rgflow_fast.geometry import blocks_per_side

__all__ = ["INTERPRETED", "KERNELS", "gather", "scatter", "coupling", "coupling_backward", "tanh"]

_BLOCK_MAX = 1024


@triton.jit
def tanh(s):
    """``tanh s`` (tl has no tanh on every supported Triton version); this form never
    overflows. Other kernel families import it from here."""
    e = tl.exp(-2.0 * tl.abs(s))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(s < 0, -th, th)


@triton.jit
def _pixel_site(C, L, off, M, K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """Where the pixels of this program of a pixel grid sit. Program ``(b·C + c, tile)`` takes
    pixels ``idx = tile·BLOCK + [0, BLOCK)`` of plane ``(b, c)``; returns ``(bc, b, c, idx,
    valid, i, j, inside, row, a, bb)``: pixel ``(i, j)``, whether a patch holds it, and if so
    its patch row ``row = b·P + p`` and element ``(a, bb)``."""
    bc = tl.program_id(0).to(tl.int64)
    b = bc // C
    c = bc % C
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < L * L
    i = idx // L
    j = idx % L
    ri = (i - off + L) % L
    rj = (j - off + L) % L
    inside = valid & ((ri % D) == 0) & ((rj % D) == 0)
    ri = ri // D
    rj = rj // D
    row = b * (M * M) + (ri // K) * M + rj // K
    return bc, b, c, idx, valid, i, j, inside, row, ri % K, rj % K


@triton.jit
def _step_site(s_ptr, t_ptr, C, L, off, M, ssr, ssc, ssh, ssw, str_, stc, sth, stw,
               PARITY: tl.constexpr, ACC: tl.constexpr, K: tl.constexpr, D: tl.constexpr,
               BLOCK: tl.constexpr):
    """:func:`_pixel_site` for a coupling step, plus the pixels it transforms (parity 0:
    a+b odd, parity 1: a+b even) and, there, its ``tanh s`` and ``t`` in the compute type
    (0 elsewhere): ``(bc, b, c, idx, valid, i, j, inside, row, a, bb, transformed, th, t)``."""
    bc, b, c, idx, valid, i, j, inside, row, a, bb = _pixel_site(C, L, off, M, K, D, BLOCK)
    transformed = inside & (((a + bb) % 2) != PARITY)
    s = tl.load(s_ptr + row * ssr + c * ssc + a * ssh + bb * ssw, mask=transformed, other=0.0)
    t = tl.load(t_ptr + row * str_ + c * stc + a * sth + bb * stw, mask=transformed, other=0.0)
    return bc, b, c, idx, valid, i, j, inside, row, a, bb, transformed, tanh(s.to(ACC)), t.to(ACC)


@triton.jit
def _gather_kernel(
    x_ptr, out_ptr, total, C, L, off, M,
    sxb, sxc, sxh, sxw,
    K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per BLOCK elements of the contiguous output (B·P, C, K, K).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < total
    bb = idx % K
    a = (idx // K) % K
    c = (idx // (K * K)) % C
    row = idx // (C * K * K)
    P = M * M
    b = row // P
    p = row % P
    i = ((p // M) * (K * D) + a * D + off) % L
    j = ((p % M) * (K * D) + bb * D + off) % L
    x = tl.load(x_ptr + b * sxb + c * sxc + i * sxh + j * sxw, mask=valid)
    tl.store(out_ptr + idx, x, mask=valid)


@triton.jit
def _scatter_kernel(
    p_ptr, x_ptr, out_ptr, C, L, off, M,
    spr, spc, sph, spw,
    sxb, sxc, sxh, sxw,
    K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):
    # out = patches on the patch pixels, x elsewhere; each is read only where it is used.
    bc, b, c, idx, valid, i, j, inside, row, a, bb = _pixel_site(C, L, off, M, K, D, BLOCK)
    val = tl.load(p_ptr + row * spr + c * spc + a * sph + bb * spw, mask=inside, other=0.0)
    keep = tl.load(x_ptr + b * sxb + c * sxc + i * sxh + j * sxw, mask=valid & ~inside, other=0.0)
    tl.store(out_ptr + bc * L * L + idx, tl.where(inside, val, keep), mask=valid)


@triton.jit
def _coupling_kernel(
    x_ptr, s_ptr, t_ptr, y_ptr, v_ptr, ldj_ptr, C, L, off, M,
    sxb, sxc, sxh, sxw, ssr, ssc, ssh, ssw, str_, stc, sth, stw,  # strides of x, s, t
    PARITY: tl.constexpr, INVERSE: tl.constexpr, EMIT: tl.constexpr,
    ACC: tl.constexpr, K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):
    # y = x·exp(tanh s) + t (inverse: (x - t)·exp(-tanh s)) on the transformed half, x
    # elsewhere; v (if EMIT) = y on the transformed half, 0 on the rest of each patch.
    bc, b, c, idx, valid, i, j, inside, row, a, bb, transformed, th, t = _step_site(
        s_ptr, t_ptr, C, L, off, M, ssr, ssc, ssh, ssw, str_, stc, sth, stw, PARITY, ACC, K, D, BLOCK
    )
    x = tl.load(x_ptr + b * sxb + c * sxc + i * sxh + j * sxw, mask=valid, other=0.0)
    xa = x.to(ACC)
    if INVERSE:
        ya = (xa - t) * tl.exp(-th)
    else:
        ya = xa * tl.exp(th) + t
    y = tl.where(transformed, ya.to(x.dtype), x)
    tl.store(y_ptr + bc * L * L + idx, y, mask=valid)
    if EMIT:
        v = tl.where(transformed, y, 0.0).to(x.dtype)
        tl.store(v_ptr + row * (C * K * K) + c * (K * K) + a * K + bb, v, mask=inside)
    part = tl.sum(tl.where(transformed, th, 0.0), axis=0)
    if INVERSE:
        part = -part
    tl.store(ldj_ptr + bc * tl.num_programs(1) + tl.program_id(1), part)


@triton.jit
def _coupling_backward_kernel(
    x_ptr, s_ptr, t_ptr, gy_ptr, gl_ptr, gv_ptr, gx_ptr, gs_ptr, gt_ptr, C, L, off, M,
    sxb, sxc, sxh, sxw, ssr, ssc, ssh, ssw, str_, stc, sth, stw,  # strides of x, s, t
    sgb, sgc, sgh, sgw, sgl, svr, svc, svh, svw,  # strides of g_y, g_ldj, g_v
    PARITY: tl.constexpr, INVERSE: tl.constexpr, HAS_GV: tl.constexpr,
    ACC: tl.constexpr, K: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
):
    # x is the step's input (forward: x, inverse: y); tanh s, exp and the inverse's output
    # are recomputed rather than saved. With g = g_y (+ g_v on the transformed half):
    #   forward: g_x = g·e,  g_t = g,      g_s = (g·x·e + g_ldj)·(1 - tanh²s),  e = exp(tanh s)
    #   inverse: g_y = g·e', g_t = -g·e',  g_s = -(g·x' + g_ldj)·(1 - tanh²s), e' = exp(-tanh s),
    #            x' = (y - t)·e'
    # and g_x = g_y, g_s = g_t = 0 off the transformed half.
    bc, b, c, idx, valid, i, j, inside, row, a, bb, transformed, th, t = _step_site(
        s_ptr, t_ptr, C, L, off, M, ssr, ssc, ssh, ssw, str_, stc, sth, stw, PARITY, ACC, K, D, BLOCK
    )
    gy = tl.load(gy_ptr + b * sgb + c * sgc + i * sgh + j * sgw, mask=valid, other=0.0)
    x = tl.load(x_ptr + b * sxb + c * sxc + i * sxh + j * sxw, mask=transformed, other=0.0).to(ACC)
    gl = tl.load(gl_ptr + b * sgl).to(ACC)
    g = gy.to(ACC)
    if HAS_GV:
        gv = tl.load(gv_ptr + row * svr + c * svc + a * svh + bb * svw, mask=transformed, other=0.0)
        g = g + gv.to(ACC)
    dth = 1.0 - th * th
    if INVERSE:
        e = tl.exp(-th)
        gx = g * e
        gt = -gx
        gs = -(g * (x - t) * e + gl) * dth
    else:
        e = tl.exp(th)
        gx = g * e
        gt = g
        gs = (g * x * e + gl) * dth
    out_ty = gx_ptr.dtype.element_ty
    tl.store(gx_ptr + bc * L * L + idx, tl.where(transformed, gx.to(out_ty), gy.to(out_ty)), mask=valid)
    at = row * (C * K * K) + c * (K * K) + a * K + bb
    tl.store(gs_ptr + at, tl.where(transformed, gs, 0.0).to(out_ty), mask=inside)
    tl.store(gt_ptr + at, tl.where(transformed, gt, 0.0).to(out_ty), mask=inside)


INTERPRETED = isinstance(_coupling_kernel, InterpretedFunction)
"""Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when Triton was
first imported): then they take CPU tensors."""


def _pixel_grid(batch_channels, image_size):
    block = min(triton.next_power_of_2(image_size * image_size), _BLOCK_MAX)
    return (batch_channels, triton.cdiv(image_size * image_size, block)), block


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def gather(x, kernel_size, dilation, offset):
    """``x (B, C, L, L)`` (any strides) -> contiguous patches ``(B·P, C, k, k)``."""
    B, C, L, _ = x.shape
    m = blocks_per_side(L, kernel_size, dilation)
    out = x.new_empty(B * m * m, C, kernel_size, kernel_size)
    total = out.numel()
    if total == 0:
        return out
    block = min(triton.next_power_of_2(total), _BLOCK_MAX)
    with _device(x):
        _gather_kernel[(triton.cdiv(total, block),)](
            x, out, total, C, L, offset, m, *x.stride(),
            K=kernel_size, D=dilation, BLOCK=block,
        )
    return out


def scatter(patches, x, kernel_size, dilation, offset):
    """Contiguous image ``(B, C, L, L)``: ``patches (B·P, C, k, k)`` on the patch pixels,
    ``x (B, C, L, L)`` elsewhere. Inputs may have any strides (a broadcast zero reads as
    zeros without memory traffic)."""
    B, C, L, _ = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    grid, block = _pixel_grid(B * C, L)
    with _device(x):
        _scatter_kernel[grid](
            patches, x, out, C, L, offset, blocks_per_side(L, kernel_size, dilation),
            *patches.stride(), *x.stride(),
            K=kernel_size, D=dilation, BLOCK=block,
        )
    return out


def coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
    """One checkerboard coupling step on the image.

    ``x (B, C, L, L)``, ``s``, ``t (B·P, C, k, k)`` (any strides) ->
    ``(y (B, C, L, L), ldj (B,), v)``: ``y = x·exp(tanh s) + t`` (``inverse``:
    ``(x - t)·exp(-tanh s)``) on the transformed half, ``ldj = ±Σ tanh s`` there, and, if
    ``emit``, ``v (B·P, C, k, k)`` = the patches of ``y`` on the transformed half and zero
    elsewhere (the next step's net input); else ``v`` is empty.
    """
    B, C, L, _ = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    v = torch.empty_like(s, memory_format=torch.contiguous_format) if emit else x.new_empty(0)
    grid, block = _pixel_grid(B * C, L)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    parts = torch.empty(B * C, grid[1], dtype=acc_dtype, device=x.device)
    if y.numel():
        with _device(x):
            _coupling_kernel[grid](
                x, s, t, y, v if emit else y, parts, C, L, offset,
                blocks_per_side(L, kernel_size, dilation),
                *x.stride(), *s.stride(), *t.stride(),
                PARITY=parity, INVERSE=inverse, EMIT=emit, ACC=_acc(x.dtype),
                K=kernel_size, D=dilation, BLOCK=block,
            )
    ldj = parts.view(B, -1).sum(dim=1).to(x.dtype)
    return y, ldj, v


def coupling_backward(x, s, t, g_y, g_ldj, g_v, kernel_size, dilation, offset, parity, inverse):
    """Gradients ``(g_x, g_s, g_t)`` of :func:`coupling` from the step's input ``x``, ``s``,
    ``t`` and the output gradients ``g_y (B, C, L, L)``, ``g_ldj (B,)`` and ``g_v`` (the
    emitted patches' gradient, or None). All inputs may have any strides."""
    B, C, L, _ = x.shape
    g_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    g_s = torch.empty_like(s, memory_format=torch.contiguous_format)
    g_t = torch.empty_like(t, memory_format=torch.contiguous_format)
    if g_x.numel() == 0:
        return g_x, g_s.zero_(), g_t.zero_()
    grid, block = _pixel_grid(B * C, L)
    with _device(x):
        _coupling_backward_kernel[grid](
            x, s, t, g_y, g_ldj, g_v if g_v is not None else g_y, g_x, g_s, g_t,
            C, L, offset, blocks_per_side(L, kernel_size, dilation),
            *x.stride(), *s.stride(), *t.stride(), *g_y.stride(), g_ldj.stride(0),
            *(g_v.stride() if g_v is not None else (0, 0, 0, 0)),
            PARITY=parity, INVERSE=inverse, HAS_GV=g_v is not None, ACC=_acc(x.dtype),
            K=kernel_size, D=dilation, BLOCK=block,
            # 128 pixels a warp: with 256, ptxas spills in bf16 on sm_80 (kernels/aot.py)
            num_warps=max(1, min(8, block // 128)),
        )
    return g_x, g_s, g_t


# The launchers under the names of the backend contract's ops (rgflow_fast.backends.OP_SCHEMAS).
KERNELS = {
    "rg_gather": gather,
    "rg_scatter": scatter,
    "rg_coupling": coupling,
    "rg_coupling_backward": coupling_backward,
}
