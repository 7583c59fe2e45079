"""Triton kernels of the ``rg_coupling_layer`` family: one RNVP coupling layer (both
checkerboard steps, the ``S`` and ``T`` residual MLPs, the tanh-clamped affine coupling and the
per-row log-det) on the patch tensor, forward, inverse and backward, with the nets' products on
tensor cores (``tl.dot``). The maths and the flat parameter layout are
:mod:`rgflow_fast.coupling_layer`'s; the differentiable op is :mod:`rgflow_fast.triton_layer`.

Kernels (one launch each; a layer is two steps, parity 0 then 1, the inverse 1 then 0)
====================================================================================

``_step_fwd_kernel``  program = ``BM`` patch rows × all ``D = C·k²`` features (padded to
    ``DP``). It loads ``u``, masks the kept half ``v``, runs ``S`` then ``T`` on ``v`` and
    writes ``u'`` and the per-row ``±Σ s``. The nets and their residual blocks are runtime
    loops (one copy of the code; nothing of one net or block is held through the next:
    ``tanh s`` waits in ``u'``'s memory while ``T`` runs). Per residual block and linear ``i`` (widths
    ``[D, H×n_mlp, D]``, hidden padded to ``HP``, a multiple of ``BH``): the ``D→H`` linear
    takes its operand ``swish(x)`` from registers; its output is produced ``BH`` columns at a
    time, Swish-ed and written to a per-program scratch tile ``(BM, HP)`` in global memory
    (L2-resident, read back ``.cg``: a ``(BM, 512)`` activation does not fit in registers);
    ``H→H`` and ``H→D`` linears stream that tile and the weights ``BH`` columns at a time
    (no ``H×H`` weight is ever held whole). The ``H→D`` output, the ``√2`` residual, ``σ``,
    ``tanh``, the coupling and the row log-det stay in registers. Scratch tiles are
    ping-ponged and fenced with a CTA barrier (``bar.sync`` orders global memory within a
    CTA). With ``STORE`` it also writes every linear's input pre-activation for the backward:
    the residual stream entering each block ``x_r`` and the final ``x_R`` (``D`` wide), and the
    hidden ``h_i`` (``H`` wide) (:func:`saved_sizes`).
``_step_bwd_kernel``  same tiling, reverse order: from the saved pre-activations it forms
    ``g_s``, ``g_t``, ``g_σ`` (per-program partials), and back-propagates through each block,
    writing every linear's output gradient ``G`` (``D`` wide for the ``H→D`` linears, ``H``
    wide for the others) and per-program partials of ``g_β``; it returns ``g_u``.
``_wgrad_kernel``  ``g_W_i = G_iᵀ · swish(h_i)``: a plain tiled GEMM over the rows (``BO×BI``
    output tiles, rows reduced in order, ``swish`` applied on the load), one launch per weight
    kind (``D→H``, ``H→H``, ``H→D``) for both nets and all blocks.

The saved buffers' rows are padded to ``NP``, a multiple of every kernel's row tile, and the
grids cover the padded rows (zero input rows, zero gradients), so no saved-tile access needs a
mask. Addresses are a scalar base that moves with the loop plus a loop-invariant int32 offset
tile: what the compiler hoists out of the loops is then half the registers of a pointer tile.

Every reduction over rows is deterministic: per-program partials summed in program order
(``g_β``, ``g_σ``), in-order loops (``g_W``), or a single ``torch.sum`` (``g_b = Σ G``), and the
per-image log-det is a sum of the per-row buffer. Nothing is atomic.

Backward strategy: the forward either stores the pre-activations (``recompute=False``,
``2·((R+1)·DP + R·n_mlp·HP)`` floats per row and step) or stores nothing but the step inputs
(``recompute=True``) and the backward re-runs ``_step_fwd_kernel`` with ``STORE`` just before
the step's backward, so the activations live only for that step (memory ``O(layer)`` instead
of ``O(model)``; one extra forward, +1/3 of the FLOPs). Rebuilding them per tile *inside*
the backward kernel would save that buffer too but costs the forward once per block
(``R`` times) because the backward walks blocks in reverse; per step is the better trade.

Precision (``PREC``): 0 ``"fp32"``: ``tl.dot(..., input_precision="ieee")`` (float64 in the
interpreter: exact float64); 1 ``"tf32"``: TF32 operands, fp32 accumulation; 2 ``"bf16"``:
bf16 weights and activations as ``tl.dot`` operands (the scratch tile is bf16), fp32
accumulation and fp32 arithmetic everywhere else (Swish, residual, coupling, log-det), the
saved pre-activations and output gradients stored in bf16 (``save_dtype``).

Floors, per step on ``N`` rows (``H`` hidden, ``R`` blocks, ``w`` bytes per operand: 4 fp32
and TF32, 2 bf16). Matmul FLOPs: ``F = 2 nets · R · 2·(2·D·H + (n_mlp-1)·H²) · N`` forward,
``2F`` backward (data and weight gradients), ``+F`` with ``recompute=True``; floor
``F / peak(precision)``. Weights are read from L2 once per program: ``2·BM / w`` FLOP per L2
byte, so the products are tensor-core bound while ``2·BM / w ≥ peak / L2 bandwidth``. HBM:
``u``, ``u'``: ``2·N·D·4`` bytes; saved pre-activations ``S = 2·((R+1)·DP + R·n_mlp·HP)·NP·4``
bytes written by the storing forward and read by the backward, ``G`` (``2·R·(DP +
n_mlp·HP)·NP·4 ≈ S``) written by the backward and read with ``S`` by the weight GEMM: ``≈ 5S``
bytes a training step against ``3F`` FLOP, floor ``5S / HBM bandwidth``. At the paper config
``S ≈ 35 kB`` a row in fp32 (``3F / 5S ≈ 85`` FLOP per byte) and half that in bf16 mode
(``≈ 170``): both under an H100's ridge points (``peak / 3 TB/s``: ≈ 165 TF32, ≈ 330 bf16),
so the saved-activation traffic, not the products, sets the training step's floor; recomputing
the pre-activations inside the weight GEMM is the next step, to be measured.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "INTERPRETED", "PRECISIONS", "MAX_D", "TileConfig", "tile_config", "saved_sizes", "split_saved",
    "step_forward", "step_backward", "weight_grads",
]

PRECISIONS = {"fp32": 0, "tf32": 1, "bf16": 2}
INV_SQRT2 = tl.constexpr(1.0 / math.sqrt(2.0))
# Widest feature dimension D = C·k² the register tiles serve (C=4, k=4); larger D would need
# the D axis tiled as well.
MAX_D = 64


@triton.jit
def _tanh(s):
    # tl has no tanh on every supported Triton version; this form never overflows.
    e = tl.exp(-2.0 * tl.abs(s))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(s < 0, -th, th)


@triton.jit
def _swish(h, beta):
    return h * tl.sigmoid(beta * h)


@triton.jit
def _swish_grads(g, h, beta):
    """``(g·∂swish/∂h, g·∂swish/∂β)`` for ``swish = h·σ(βh)``."""
    sg = tl.sigmoid(beta * h)
    d = sg * (1.0 - sg)
    return g * (sg + beta * h * d), g * h * h * d


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` in the precision mode ``PREC`` (module docstring): tensor cores for TF32
    and bf16, exact fp32 (or float64) FMA products for ``ieee``."""
    if PREC == 2:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif PREC == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _checkerboard(f, D, K: tl.constexpr, PARITY: tl.constexpr):
    """Feature ``f = c·k² + a·k + bb`` is transformed by step ``PARITY`` (``a+bb`` odd for 0)."""
    if PARITY == 0:
        hit = (((f % (K * K)) // K + f % K) % 2) == 1
    else:
        hit = (((f % (K * K)) // K + f % K) % 2) == 0
    return hit & (f < D)


@triton.jit
def _net_forward(
    x, pid, w_in, w_mid, w_out, vec, scr, xsave, hsave, NP,
    NET, N_RES: tl.constexpr, N_MLP: tl.constexpr, DP: tl.constexpr,
    HP: tl.constexpr, VW: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr,
    STORE: tl.constexpr, PREC: tl.constexpr,
):
    """``R(x)`` for net ``NET`` (0: S, 1: T) on a ``(BM, DP)`` tile (module docstring); returns ``x_R``.

    Addresses are a scalar base (which moves with the loop) plus a loop-invariant int32 offset
    tile: a hoisted offset tile costs half the registers of a hoisted pointer tile, and equal
    offset tiles are shared. Saved rows are padded to ``NP`` (a multiple of ``BM``): no masks."""
    f = tl.arange(0, DP)
    cols = tl.arange(0, BH)
    lr = tl.arange(0, BM)
    off_s = lr[:, None] * HP + cols[None, :]       # scratch and saved hidden tile (BM, BH)
    off_x = lr[:, None] * DP + f[None, :]          # saved residual-stream tile (BM, DP)
    off_wi = f[:, None] + cols[None, :] * DP       # W_inᵀ tile (DP, BH)
    off_wm = cols[:, None] + cols[None, :] * HP    # W_midᵀ tile (BH, BH)
    off_wo = cols[:, None] + f[None, :] * HP       # W_outᵀ tile (BH, DP)
    x_net = xsave + (NET * (N_RES + 1) * NP + pid * BM) * DP
    scr_tile = scr + pid * (2 * BM * HP)
    # a runtime loop over the residual blocks: one copy of the code, and nothing of one block
    # (addresses, offsets) is computed ahead and held through the others
    for r in range(N_RES):
        blk = NET * N_RES + r
        vb = vec + blk * (N_MLP + 1) * 2 * VW
        h_blk = hsave + (blk * N_MLP * NP + pid * BM) * HP  # h_1 .. h_n_mlp of this block
        if STORE:
            tl.store(x_net + r * NP * DP + off_x, x.to(xsave.dtype.element_ty))
        # linear 0 (D -> H): operand swish(x) from registers; output Swish-ed into scratch 0
        a0 = _swish(x, tl.load(vb + f)[None, :]).to(w_in.dtype.element_ty)
        for j in range(0, HP, BH):
            w = tl.load(w_in + blk * (HP * DP) + j * DP + off_wi)
            h = _mm(a0, w, tl.zeros((BM, BH), x.dtype), PREC) + tl.load(vb + VW + j + cols)[None, :]
            if STORE:
                tl.store(h_blk + j + off_s, h.to(hsave.dtype.element_ty))
            a = _swish(h, tl.load(vb + 2 * VW + j + cols)[None, :])
            tl.store(scr_tile + j + off_s, a.to(scr.dtype.element_ty))
        tl.debug_barrier()
        # linears 1 .. n_mlp-1 (H -> H): stream scratch (i-1)%2 and W, write scratch i%2
        for i in tl.static_range(1, N_MLP):
            src = scr_tile + ((i - 1) % 2) * (BM * HP)
            dst = scr_tile + (i % 2) * (BM * HP)
            wb = w_mid + (blk * (N_MLP - 1) + i - 1) * (HP * HP)
            for j in range(0, HP, BH):
                acc = tl.zeros((BM, BH), x.dtype)
                for kk in range(0, HP, BH):
                    a = tl.load(src + kk + off_s, cache_modifier=".cg")
                    w = tl.load(wb + j * HP + kk + off_wm)
                    acc = _mm(a, w, acc, PREC)
                h = acc + tl.load(vb + (2 * i + 1) * VW + j + cols)[None, :]
                if STORE:
                    tl.store(h_blk + i * NP * HP + j + off_s, h.to(hsave.dtype.element_ty))
                a = _swish(h, tl.load(vb + (2 * i + 2) * VW + j + cols)[None, :])
                tl.store(dst + j + off_s, a.to(scr.dtype.element_ty))
            tl.debug_barrier()
        # linear n_mlp (H -> D) into registers, then the residual
        # (loop variables are named per loop: Triton carries a name defined before a loop)
        src = scr_tile + ((N_MLP - 1) % 2) * (BM * HP)
        acc_o = tl.zeros((BM, DP), x.dtype)
        for kk in range(0, HP, BH):
            a_o = tl.load(src + kk + off_s, cache_modifier=".cg")
            w_o = tl.load(w_out + blk * (DP * HP) + kk + off_wo)
            acc_o = _mm(a_o, w_o, acc_o, PREC)
        x = (x + (acc_o + tl.load(vb + (2 * N_MLP + 1) * VW + f)[None, :])) * INV_SQRT2
        tl.debug_barrier()  # the next block overwrites the scratch this one just read
    if STORE:
        tl.store(x_net + N_RES * NP * DP + off_x, x.to(xsave.dtype.element_ty))
    return x


@triton.jit
def _step_fwd_kernel(
    u_ptr, y_ptr, rows_ptr, w_in, w_mid, w_out, vec, sig, scr, xsave, hsave, N, NP, D,
    K: tl.constexpr, PARITY: tl.constexpr, INVERSE: tl.constexpr, STORE: tl.constexpr,
    N_RES: tl.constexpr, N_MLP: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
    VW: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):
    """One checkerboard step on rows ``[pid·BM, pid·BM + BM)`` of ``u (N, D)`` (contiguous)."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    f = tl.arange(0, DP)
    # The S net (0), then the T net (1), as a runtime loop: one copy of the nets' code, and no
    # tile of one net is held while the other runs (tanh(s) waits in y's memory, read back by
    # the thread that wrote it).
    for net in range(2):
        trans = _checkerboard(f, D, K, PARITY)[None, :]
        ptrs = rows[:, None] * D + f[None, :]
        mask = (rows < N)[:, None] & (f < D)[None, :]
        v = tl.where(trans, 0.0, tl.load(u_ptr + ptrs, mask=mask, other=0.0))
        x = _net_forward(v, pid, w_in, w_mid, w_out, vec, scr, xsave, hsave, NP, net,
                         N_RES, N_MLP, DP, HP, VW, BM, BH, STORE, PREC)
        o = tl.load(sig + net * DP + f)[None, :] * x
        if net == 0:
            tl.store(y_ptr + ptrs, _tanh(o), mask=mask)
        else:
            tl.debug_barrier()
            t = tl.where(trans, o, 0.0)
            s = tl.where(trans, tl.load(y_ptr + ptrs, mask=mask, other=0.0), 0.0)
            u = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
            if INVERSE:
                y = tl.where(trans, (u - t) * tl.exp(-s), u)
                ldj = -tl.sum(s, axis=1)
            else:
                y = tl.where(trans, u * tl.exp(s) + t, u)
                ldj = tl.sum(s, axis=1)
            tl.store(y_ptr + ptrs, y, mask=mask)
            tl.store(rows_ptr + rows, ldj, mask=rows < N)


@triton.jit
def _net_backward(
    g_o, pid, w_in, w_mid, w_out, vec, sig, xsave, hsave, gdsave, ghsave, pvec, psig, NP,
    NET, N_RES: tl.constexpr, N_MLP: tl.constexpr, DP: tl.constexpr,
    HP: tl.constexpr, VW: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):
    """Back-propagate ``g_o = ∂L/∂(σ⊙R(v))`` through net ``NET``; returns ``∂L/∂v``.

    Writes ``G`` (each linear's output gradient: ``gdsave`` for the ``H→D`` one, ``ghsave``
    for the others) for the weight GEMM and this program's partial sums of ``g_σ`` and
    ``g_β``. Addressing as in :func:`_net_forward`."""
    f = tl.arange(0, DP)
    cols = tl.arange(0, BH)
    lr = tl.arange(0, BM)
    off_h = lr[:, None] * HP + cols[None, :]       # saved hidden / G tile (BM, BH)
    off_x = lr[:, None] * DP + f[None, :]          # saved residual stream / G tile (BM, DP)
    off_bo = f[:, None] * HP + cols[None, :]       # W_out tile (DP, BH)
    off_bm = cols[:, None] * HP + cols[None, :]    # W_mid tile (BH, BH)
    off_bi = cols[:, None] * DP + f[None, :]       # W_in tile (BH, DP)
    x_net = xsave + (NET * (N_RES + 1) * NP + pid * BM) * DP
    x_last = tl.load(x_net + N_RES * NP * DP + off_x).to(g_o.dtype)
    tl.store(psig + (pid * 2 + NET) * DP + f, tl.sum(g_o * x_last, axis=0))
    g_x = g_o * tl.load(sig + NET * DP + f)[None, :]
    for rr in range(N_RES):  # runtime loop, as in _net_forward
        r = N_RES - 1 - rr
        blk = NET * N_RES + r
        vb = vec + blk * (N_MLP + 1) * 2 * VW
        pb = pvec + (pid * (2 * N_RES) + blk) * ((N_MLP + 1) * VW)
        h_blk = hsave + (blk * N_MLP * NP + pid * BM) * HP    # h_i at h_blk + (i-1)·NP·HP
        g_blk = ghsave + (blk * N_MLP * NP + pid * BM) * HP   # G_i (i < n_mlp) at g_blk + i·NP·HP
        # linear n_mlp (H -> D): its output gradient is g_x/√2, in registers
        g_f = g_x * INV_SQRT2
        tl.store(gdsave + (blk * NP + pid * BM) * DP + off_x, g_f.to(gdsave.dtype.element_ty))
        g_f_op = g_f.to(w_out.dtype.element_ty)
        for j in range(0, HP, BH):
            w = tl.load(w_out + blk * (DP * HP) + j + off_bo)
            g_a = _mm(g_f_op, w, tl.zeros((BM, BH), g_x.dtype), PREC)
            h = tl.load(h_blk + (N_MLP - 1) * NP * HP + j + off_h).to(g_x.dtype)
            g_h, g_beta = _swish_grads(g_a, h, tl.load(vb + 2 * N_MLP * VW + j + cols)[None, :])
            tl.store(pb + N_MLP * VW + j + cols, tl.sum(g_beta, axis=0))
            tl.store(g_blk + (N_MLP - 1) * NP * HP + j + off_h, g_h.to(ghsave.dtype.element_ty))
        tl.debug_barrier()
        # linears n_mlp-1 .. 1 (H -> H): stream G of linear i and W_i, write G of linear i-1
        for ii in tl.static_range(1, N_MLP):
            i = N_MLP - ii
            wb = w_mid + (blk * (N_MLP - 1) + i - 1) * (HP * HP)
            for j in range(0, HP, BH):
                acc = tl.zeros((BM, BH), g_x.dtype)
                for kk in range(0, HP, BH):
                    g = tl.load(g_blk + i * NP * HP + kk + off_h, cache_modifier=".cg")
                    w = tl.load(wb + kk * HP + j + off_bm)
                    acc = _mm(g.to(w_mid.dtype.element_ty), w, acc, PREC)
                h = tl.load(h_blk + (i - 1) * NP * HP + j + off_h).to(g_x.dtype)
                g_h, g_beta = _swish_grads(acc, h, tl.load(vb + 2 * i * VW + j + cols)[None, :])
                tl.store(pb + i * VW + j + cols, tl.sum(g_beta, axis=0))
                tl.store(g_blk + (i - 1) * NP * HP + j + off_h, g_h.to(ghsave.dtype.element_ty))
            tl.debug_barrier()
        # linear 0 (D -> H): back into registers, through swish(x_r), plus the skip path
        acc_i = tl.zeros((BM, DP), g_x.dtype)
        for kk in range(0, HP, BH):
            g_i = tl.load(g_blk + kk + off_h, cache_modifier=".cg")
            w_i = tl.load(w_in + blk * (HP * DP) + kk * DP + off_bi)
            acc_i = _mm(g_i.to(w_in.dtype.element_ty), w_i, acc_i, PREC)
        x_r = tl.load(x_net + r * NP * DP + off_x).to(g_x.dtype)
        g_in, g_beta0 = _swish_grads(acc_i, x_r, tl.load(vb + f)[None, :])
        tl.store(pb + f, tl.sum(g_beta0, axis=0))
        g_x = g_x * INV_SQRT2 + g_in
    return g_x


@triton.jit
def _step_bwd_kernel(
    u_ptr, gy_ptr, grow_ptr, gu_ptr, w_in, w_mid, w_out, vec, sig, xsave, hsave, gdsave, ghsave,
    pvec, psig, N, NP, D,
    K: tl.constexpr, PARITY: tl.constexpr, INVERSE: tl.constexpr,
    N_RES: tl.constexpr, N_MLP: tl.constexpr, DP: tl.constexpr, HP: tl.constexpr,
    VW: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of one step: ``u`` the step input, ``gy`` ``∂L/∂u'``, ``grow`` ``∂L/∂(row ldj)``."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    f = tl.arange(0, DP)
    # The S net (0), then the T net (1), as a runtime loop (as in _step_fwd_kernel): each
    # iteration rebuilds its output gradient from the step's inputs and the saved x_R; the S
    # net's input gradient waits in g_u's memory (read back by the thread that wrote it).
    for net in range(2):
        trans = _checkerboard(f, D, K, PARITY)[None, :]
        ptrs = rows[:, None] * D + f[None, :]
        mask = (rows < N)[:, None] & (f < D)[None, :]
        last = xsave + (N_RES * NP + pid * BM) * DP + tl.arange(0, BM)[:, None] * DP + f[None, :]
        gy = tl.load(gy_ptr + ptrs, mask=mask, other=0.0)
        th = _tanh(tl.load(sig + f)[None, :] * tl.load(last).to(gy.dtype))
        s = tl.where(trans, th, 0.0)
        e = tl.exp(-s) if INVERSE else tl.exp(s)
        if net == 0:
            g_row = tl.load(grow_ptr + rows, mask=rows < N, other=0.0)[:, None]
            u = tl.load(u_ptr + ptrs, mask=mask, other=0.0)
            if INVERSE:
                t = tl.where(trans, tl.load(sig + DP + f)[None, :] * tl.load(last + (N_RES + 1) * NP * DP).to(gy.dtype), 0.0)
                g_o = tl.where(trans, -gy * ((u - t) * e) - g_row, 0.0) * (1.0 - th * th)
            else:
                g_o = tl.where(trans, gy * u * e + g_row, 0.0) * (1.0 - th * th)
        else:
            g_o = tl.where(trans, -gy * e if INVERSE else gy, 0.0)
        g_v = _net_backward(g_o, pid, w_in, w_mid, w_out, vec, sig, xsave, hsave, gdsave, ghsave,
                            pvec, psig, NP, net, N_RES, N_MLP, DP, HP, VW, BM, BH, PREC)
        if net == 0:
            tl.store(gu_ptr + ptrs, g_v, mask=mask)
        else:
            tl.debug_barrier()
            g_v += tl.load(gu_ptr + ptrs, mask=mask, other=0.0)
            tl.store(gu_ptr + ptrs, tl.where(trans, gy * e, gy + g_v), mask=mask)


@triton.jit
def _wgrad_kernel(
    g_ptr, a_ptr, vec, out, NP,
    N_RES: tl.constexpr, N_MLP: tl.constexpr, VW: tl.constexpr, KIND: tl.constexpr,
    CNT: tl.constexpr, OUT_W: tl.constexpr, IN_W: tl.constexpr,
    BO: tl.constexpr, BI: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """``g_W[z] = G_iᵀ · swish(h_i)`` for one kind of linear (``KIND`` 0: ``D→H``, its ``h`` in
    ``xsave``; 1: ``H→H``; 2: ``H→D``, its ``G`` in ``gdsave``) of every block of both nets
    (``z = (net·R + r)·CNT + c``), tile ``(BO, BI)``, the ``NP`` (padded, a multiple of ``BN``)
    rows reduced in order. ``G`` rows are ``OUT_W`` wide, ``h`` rows ``IN_W``."""
    z = tl.program_id(2)
    blk = z // CNT  # net·R + r
    c = z % CNT
    if KIND == 0:
        i = 0
        gslot = blk * N_MLP                                      # in ghsave
        aslot = (blk // N_RES) * (N_RES + 1) + blk % N_RES       # x_r in xsave
    elif KIND == 1:
        i = 1 + c
        gslot = blk * N_MLP + i
        aslot = blk * N_MLP + i - 1                              # h_i in hsave
    else:
        i = N_MLP
        gslot = blk                                              # in gdsave
        aslot = blk * N_MLP + N_MLP - 1
    o = tl.program_id(0) * BO + tl.arange(0, BO)
    k = tl.program_id(1) * BI + tl.arange(0, BI)
    n = tl.arange(0, BN)
    omask = o < OUT_W
    kmask = k < IN_W
    off_g = n[None, :] * OUT_W + o[:, None]        # Gᵀ tile (BO, BN)
    off_a = n[:, None] * IN_W + k[None, :]         # h tile (BN, BI)
    beta = tl.load(vec + (blk * (N_MLP + 1) + i) * 2 * VW + k, mask=kmask, other=0.0)[None, :]
    acc = tl.zeros((BO, BI), out.dtype.element_ty)
    for n0 in range(0, NP, BN):
        g = tl.load(g_ptr + (gslot * NP + n0) * OUT_W + off_g, mask=omask[:, None], other=0.0)
        h = tl.load(a_ptr + (aslot * NP + n0) * IN_W + off_a, mask=kmask[None, :], other=0.0)
        acc = _mm(g.to(acc.dtype), _swish(h.to(acc.dtype), beta), acc, PREC)
    tl.store(out + z * (OUT_W * IN_W) + o[:, None] * IN_W + k[None, :], acc,
             mask=omask[:, None] & kmask[None, :])


INTERPRETED = isinstance(_step_fwd_kernel, InterpretedFunction)


# --- launchers ---------------------------------------------------------------------------


# Tiles per architecture (90: Hopper and newer, 80: Ampere/Ada) and precision: BH (hidden
# chunk), and per kernel (rows per program BM, num_warps, num_stages, maxnreg) or, for the
# weight GEMM, (BO, BI, BN, num_warps, num_stages). Chosen with python -m
# rgflow_fast.kernels.aot so that nothing spills. On sm_80 ptxas caps 8-warp programs at 128
# registers unless told otherwise (maxnreg 255 there), and the backward needs the loads
# software-pipelined (num_stages 2) to fit.
_GPU_TILES = {
    90: {
        "fp32": dict(BH=16, fwd=(64, 8, 1, None), bwd=(64, 8, 1, None), wgrad=(32, 32, 32, 4, 2)),
        "tf32": dict(BH=32, fwd=(64, 8, 1, None), bwd=(64, 8, 1, None), wgrad=(64, 64, 32, 4, 2)),
        "bf16": dict(BH=32, fwd=(64, 4, 1, None), bwd=(64, 8, 1, None), wgrad=(64, 64, 32, 4, 2)),
    },
    80: {
        "fp32": dict(BH=16, fwd=(64, 8, 1, 255), bwd=(64, 8, 1, 255), wgrad=(32, 32, 32, 4, 2)),
        "tf32": dict(BH=16, fwd=(64, 8, 1, 255), bwd=(32, 8, 2, 255), wgrad=(64, 64, 32, 4, 2)),
        "bf16": dict(BH=16, fwd=(64, 8, 1, 255), bwd=(32, 8, 2, 255), wgrad=(64, 64, 32, 4, 2)),
    },
}
# The interpreter runs a program as numpy ops: few, small programs are fastest.
_INTERPRETER_TILES = dict(BH=16, fwd=(16, 4, 1, None), bwd=(16, 4, 1, None), wgrad=(16, 16, 16, 4, 1))


class TileConfig:
    """Tile sizes of a shape: hidden chunk ``BH``; padded widths ``DP`` (features), ``HP``
    (hidden, a multiple of ``BH``) and ``VW = max(DP, HP)`` (slot width of the saved buffers);
    per kernel rows per program and ``num_warps``/``num_stages``; the weight GEMM's
    ``(BO, BI, BN)`` tile; and ``ROWS``, the multiple the saved buffers' rows are padded to."""

    def __init__(self, D, hidden, interpreted, precision, arch=90):
        tiles = _INTERPRETER_TILES if interpreted else _GPU_TILES[90 if arch >= 90 else 80][precision]
        self.DP = max(16, triton.next_power_of_2(D))
        self.BH = tiles["BH"]
        self.HP = self.BH * triton.cdiv(max(hidden, 1), self.BH)
        self.VW = max(self.DP, self.HP)
        self.fwd_BM, self.fwd_warps, self.fwd_stages, self.fwd_maxnreg = tiles["fwd"]
        self.bwd_BM, self.bwd_warps, self.bwd_stages, self.bwd_maxnreg = tiles["bwd"]
        self.BO, self.BI, self.BN, self.wgrad_warps, self.wgrad_stages = tiles["wgrad"]
        self.ROWS = max(self.fwd_BM, self.bwd_BM, self.BN)

    def padded_rows(self, N):
        return triton.cdiv(N, self.ROWS) * self.ROWS

    def __repr__(self):
        return (f"TileConfig(DP={self.DP}, HP={self.HP}, BH={self.BH}, fwd=({self.fwd_BM}, "
                f"{self.fwd_warps}), bwd=({self.bwd_BM}, {self.bwd_warps}), wgrad=({self.BO}, "
                f"{self.BI}, {self.BN}, {self.wgrad_warps}))")


def tile_config(D, hidden, device, precision="fp32", arch=None):
    """The tiles for ``D`` features and ``hidden`` units on ``device`` (its compute capability
    ``arch``, e.g. 90, unless given: sm_80-class GPUs hold the accumulators in registers and
    get smaller tiles than Hopper's wgmma)."""
    interpreted = device.type != "cuda"
    if arch is None:
        arch = 90
        if not interpreted and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            arch = 10 * major + minor
    return TileConfig(D, hidden, interpreted, precision, arch)


def _meta(cfg, K, n_res, n_mlp, precision, BM, num_warps, num_stages, maxnreg):
    meta = dict(K=K, N_RES=n_res, N_MLP=n_mlp, DP=cfg.DP, HP=cfg.HP, VW=cfg.VW, BM=BM,
                BH=cfg.BH, PREC=PRECISIONS[precision], num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        meta["maxnreg"] = maxnreg
    return meta


def saved_sizes(cfg, n_res, n_mlp, N):
    """Elements of a step's saved activations: ``x`` (the residual stream ``x_r`` entering each
    block and ``x_R``: ``(2, R+1, NP, DP)``) and ``h`` (each block's hidden pre-activations
    ``h_1 .. h_n_mlp``: ``(2, R, n_mlp, NP, HP)``), rows padded to ``NP``."""
    NP = cfg.padded_rows(N)
    return 2 * (n_res + 1) * NP * cfg.DP, 2 * n_res * n_mlp * NP * cfg.HP


def split_saved(saved, cfg, n_res, n_mlp, N):
    """The ``(xsave, hsave)`` views of a step's flat saved buffer (:func:`saved_sizes`)."""
    NP = cfg.padded_rows(N)
    nx, nh = saved_sizes(cfg, n_res, n_mlp, N)
    return (saved[:nx].view(2, n_res + 1, NP, cfg.DP),
            saved[nx:nx + nh].view(2, n_res, n_mlp, NP, cfg.HP))


def step_forward(u, w_in, w_mid, w_out, vec, sig, cfg, K, parity, inverse, n_res, n_mlp,
                 precision, store, save_dtype=None):
    """One step on ``u (N, D)`` (contiguous). Weights packed as
    :func:`rgflow_fast.triton_layer.pack_params` packs them, in the operand dtype.

    Returns ``(u' (N, D), rows (N,), saved)``: ``saved`` is the flat buffer of the step's
    pre-activations (:func:`split_saved`) in ``save_dtype`` (default ``u``'s; bf16 halves
    the backward's memory traffic) when ``store``, else empty."""
    N, D = u.shape
    NP = cfg.padded_rows(N)
    grid = (NP // cfg.fwd_BM,)  # padded rows too: every saved row is written
    y = torch.empty_like(u)
    rows = u.new_empty(N)
    scr = torch.empty(grid[0] * 2 * cfg.fwd_BM * cfg.HP, dtype=w_in.dtype, device=u.device)
    saved = u.new_empty(sum(saved_sizes(cfg, n_res, n_mlp, N)) if store else 0, dtype=save_dtype or u.dtype)
    xsave, hsave = split_saved(saved, cfg, n_res, n_mlp, N) if store else (u, u)
    _step_fwd_kernel[grid](
        u, y, rows, w_in, w_mid, w_out, vec, sig, scr, xsave, hsave, N, NP, D,
        PARITY=parity, INVERSE=inverse, STORE=store,
        **_meta(cfg, K, n_res, n_mlp, precision, cfg.fwd_BM, cfg.fwd_warps, cfg.fwd_stages,
                cfg.fwd_maxnreg),
    )
    return y, rows, saved


def step_backward(u, g_y, g_rows, saved, w_in, w_mid, w_out, vec, sig, cfg, K, parity, inverse,
                  n_res, n_mlp, precision):
    """Backward of one step from its saved activations. Returns ``(g_u (N, D), gdsave,
    ghsave, g_β partials, g_σ partials)``: each linear's output gradient ``G`` (zero on padded
    rows) for the ``H→D`` linears ``gdsave (2, R, NP, DP)`` and the others ``ghsave (2, R,
    n_mlp, NP, HP)``; ``g_β`` partials ``(programs, 2, R, n_mlp+1, VW)``, ``g_σ`` partials
    ``(programs, 2, DP)``. ``G`` is kept in ``saved``'s dtype."""
    N, D = u.shape
    NP = cfg.padded_rows(N)
    grid = (NP // cfg.bwd_BM,)
    g_u = torch.empty_like(u)
    xsave, hsave = split_saved(saved, cfg, n_res, n_mlp, N)
    gdsave = saved.new_empty(2, n_res, NP, cfg.DP)
    ghsave = saved.new_empty(2, n_res, n_mlp, NP, cfg.HP)
    pvec = u.new_zeros(grid[0], 2, n_res, n_mlp + 1, cfg.VW)
    psig = u.new_empty(grid[0], 2, cfg.DP)
    _step_bwd_kernel[grid](
        u, g_y, g_rows, g_u, w_in, w_mid, w_out, vec, sig, xsave, hsave, gdsave, ghsave, pvec,
        psig, N, NP, D, PARITY=parity, INVERSE=inverse,
        **_meta(cfg, K, n_res, n_mlp, precision, cfg.bwd_BM, cfg.bwd_warps, cfg.bwd_stages,
                cfg.bwd_maxnreg),
    )
    return g_u, gdsave, ghsave, pvec, psig


def weight_grads(saved, gdsave, ghsave, vec, cfg, n_res, n_mlp, precision, dtype):
    """``(g_W_in (2R, HP, DP), g_W_mid (2R(n_mlp-1), HP, HP), g_W_out (2R, DP, HP))``."""
    NP = ghsave.shape[3]
    xsave, hsave = split_saved(saved, cfg, n_res, n_mlp, NP)
    out = []
    for kind, cnt, out_w, in_w, g_buf, a_buf in (
        (0, 1, cfg.HP, cfg.DP, ghsave, xsave),
        (1, n_mlp - 1, cfg.HP, cfg.HP, ghsave, hsave),
        (2, 1, cfg.DP, cfg.HP, gdsave, hsave),
    ):
        g = torch.empty(2 * n_res * cnt, out_w, in_w, dtype=dtype, device=ghsave.device)
        if g.numel():
            grid = (triton.cdiv(out_w, cfg.BO), triton.cdiv(in_w, cfg.BI), 2 * n_res * cnt)
            _wgrad_kernel[grid](
                g_buf, a_buf, vec, g, NP, N_RES=n_res, N_MLP=n_mlp, VW=cfg.VW, KIND=kind, CNT=cnt,
                OUT_W=out_w, IN_W=in_w, BO=cfg.BO, BI=cfg.BI, BN=cfg.BN,
                PREC=PRECISIONS[precision], num_warps=cfg.wgrad_warps, num_stages=cfg.wgrad_stages,
            )
        out.append(g)
    return out
