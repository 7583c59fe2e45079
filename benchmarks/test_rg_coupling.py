"""Benchmarks of the rg_coupling op family: gather, scatter, coupling forward, backward
(all input gradients, from a retained graph) and inverse, every backend beside the
reference and ``torch.compile`` of the reference.

Sizes: "paper" is the CelebA-32 setting, batch 64 of 3x32x32 fp32 images, on the level-0
block with offset k/2 (the block that touches every pixel and wraps around the edges);
0.8 MB per image tensor, so on a GPU it lives in L2 as it does inside the model. "large"
(GPU only, with the paper sizes) is batch 512 of 3x128x128, 100 MB per image tensor, larger
than an H100's or H200's L2: it measures the HBM roofline.
"""
from __future__ import annotations

import os

import pytest
import torch

import rgflow_fast as rf

import harness as bench
import floors

SHAPES = {"paper": floors.OpShape(64, 3, 32, 4, 1, 2)}
if bench.DEVICE.type == "cuda" and bench.SIZES == "paper":
    SHAPES["large"] = floors.OpShape(512, 3, 128, 4, 1, 2)
PARITY = 0
DTYPE = torch.float32
# Gather and scatter copy values: every backend must be exact. The couplings round exp/tanh.
TOLERANCE = {"gather": (0.0, 0.0), "scatter": (0.0, 0.0)}
COUPLING_TOLERANCE = (1e-5, 1e-4)  # (rtol, atol), float32

_SEED = int.from_bytes(os.urandom(4), "little")


def _inputs(shape: floors.OpShape):
    g = torch.Generator().manual_seed(_SEED)
    m = shape.image_size // (shape.kernel_size * shape.dilation)
    image = (shape.batch, shape.channels, shape.image_size, shape.image_size)
    patch = (shape.batch * m * m, shape.channels, shape.kernel_size, shape.kernel_size)

    def rand(size, scale=1.0):
        return (scale * torch.randn(size, generator=g, dtype=DTYPE)).to(bench.DEVICE)

    return {"x": rand(image), "s": rand(patch, 0.5), "t": rand(patch), "patches": rand(patch)}


def _ops(backend):
    """The four public ops as ``backend`` runs them (the compiled case: under
    ``torch.compile``, inside ``bench.use``, which selects the reference)."""
    names = ("rg_gather", "rg_scatter", "rg_coupling", "rg_coupling_inverse")
    ops = {n: getattr(rf.functional, n) for n in names}
    if backend == bench.COMPILED:
        return {n: torch.compile(op, dynamic=False) for n, op in ops.items()}
    return ops


def _case(op, ops, inp, geometry):
    """A zero-argument callable running ``op`` once; its outputs are what gets checked."""
    x, s, t = inp["x"], inp["s"], inp["t"]
    if op == "gather":
        return lambda: ops["rg_gather"](x, *geometry)
    if op == "scatter":
        return lambda: ops["rg_scatter"](inp["patches"], x, *geometry)
    if op == "coupling_forward":
        return lambda: ops["rg_coupling"](x, s, t, *geometry, PARITY)
    if op == "coupling_inverse":
        return lambda: ops["rg_coupling_inverse"](x, s, t, *geometry, PARITY)
    # backward: gradients of (y, ldj) w.r.t. (x, s, t) through one retained forward graph
    leaves = [v.detach().clone().requires_grad_() for v in (x, s, t)]
    y, ldj = ops["rg_coupling"](*leaves, *geometry, PARITY)
    g = torch.Generator().manual_seed(_SEED + 1)
    grads = [torch.randn(v.shape, generator=g, dtype=DTYPE).to(bench.DEVICE) for v in (y, ldj)]
    return lambda: torch.autograd.grad((y, ldj), leaves, grads, retain_graph=True)


@pytest.mark.parametrize("size", list(SHAPES))
@pytest.mark.parametrize("op", list(floors.OP_BYTES))
@bench.case_backends()
def test_rg_coupling(benchmark, op, size, backend):
    shape = SHAPES[size]
    inp = _inputs(shape)
    bench.require_backend(backend, inp["x"])
    geometry = (shape.kernel_size, shape.dilation, shape.offset)
    with bench.use(bench.REFERENCE):
        expected = _case(op, _ops(bench.REFERENCE), inp, geometry)()
    with bench.use(backend):
        fn = _case(op, _ops(backend), inp, geometry)
        rtol, atol = TOLERANCE.get(op, COUPLING_TOLERANCE)
        bench.assert_close(fn(), expected, rtol=rtol, atol=atol, what=f"{op} on {backend}")
        bench.run_case(benchmark, fn, name=f"{op}_{size}", backend=backend, size=size,
                       dtype=DTYPE, nbytes=floors.op_bytes(op, shape))
