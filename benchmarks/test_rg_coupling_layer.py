"""Benchmarks of the rg_coupling_layer op family: one whole coupling layer (both steps, both
nets, coupling and log-det) forward, inverse, and forward + backward (gradients of the input
and of every parameter), every backend beside the reference and ``torch.compile`` of the
reference.

Sizes: "small" (the CPU default) is the level-0 layer of the "mid" model config of
test_model.py: 1024 patch rows (batch 16 of 3x32x32, k 4), hidden 128, 4 residual blocks,
n_mlp 2. "paper" is the CelebA-32 level-0 layer: 4096 rows (batch 64), hidden 512.
"""
from __future__ import annotations

import os

import pytest
import torch

import rgflow_fast as rf
from rgflow_fast import coupling_layer
from rgflow_fast.model import CouplingLayer

import harness as bench

# rows, channels, kernel size, hidden, residual blocks, n_mlp, batch
SHAPES = {"small": (1024, 3, 4, 128, 4, 2, 16), "paper": (4096, 3, 4, 512, 4, 2, 64)}
N, C, K, HIDDEN, N_RES, N_MLP, BATCH = SHAPES[bench.SIZES]
DTYPE = torch.float32
REL_TOL = 1e-4  # ‖out - ref‖ / ‖ref‖ per output, float32
CASES = ("forward", "inverse", "forward_backward")

_SEED = int.from_bytes(os.urandom(4), "little")


def _setup():
    torch.manual_seed(_SEED)
    layer = CouplingLayer(C * K * K, HIDDEN, N_MLP, N_RES)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    layer = layer.to(bench.DEVICE, DTYPE)
    u = torch.randn(N, C, K, K, dtype=DTYPE).to(bench.DEVICE)
    ldj = torch.zeros(BATCH, dtype=DTYPE, device=bench.DEVICE)
    return layer.op_parameters(), u, ldj


def _flops(case):
    widths = [C * K * K] + [HIDDEN] * N_MLP + [C * K * K]
    forward = N * 2 * 2 * N_RES * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3 * forward if case == "forward_backward" else forward


def _case(case, backend, params, u, ldj):
    op = coupling_layer.rg_coupling_layer
    if backend == bench.COMPILED:
        op = torch.compile(coupling_layer.reference_layer, dynamic=False)
    inverse = case == "inverse"

    def run():
        if case != "forward_backward":
            with torch.no_grad():
                return op(u, ldj, params, N_MLP, inverse, False)
        leaf = u.detach().requires_grad_()
        y, l = op(leaf, ldj, params, N_MLP, False, False)
        return torch.autograd.grad((y, l), [leaf] + params, (torch.ones_like(y), torch.ones_like(l)))

    return run


@pytest.mark.parametrize("case", CASES)
@bench.case_backends()
def test_rg_coupling_layer(benchmark, case, backend):
    params, u, ldj = _setup()
    bench.require_backend(backend, u)
    with bench.use(bench.REFERENCE):
        expected = _case(case, bench.REFERENCE, params, u, ldj)()
    with bench.use(backend):
        run = _case(case, backend, params, u, ldj)
        for i, (a, b) in enumerate(zip(run(), expected)):
            err = float((a - b).norm() / b.norm().clamp_min(1e-30))
            assert err < REL_TOL, f"{case} on {backend}, output {i}: relative error {err:.2e}"
        bench.run_case(benchmark, run, name=f"layer_{case}", backend=backend, size=bench.SIZES,
                       dtype=DTYPE, flops=_flops(case))
