"""Benchmarks of the whole RG-Flow model: ``log_prob`` (no grad), one training step
(``-log_prob(x).mean()``, backward, global grad-norm clip 1, AdamW lr 1e-3, weight decay
5e-5: the paper's recipe) and ``sample``; every backend beside the reference and
``torch.compile`` of the reference.

Configs: with the paper sizes, "paper_celeba" (image 32, 3 channels, the defaults: n_layers
8,6,4,2, 4 residual blocks, n_mlp 2, hidden 512) and "msds" (the same with 4 layers per
level), batch 64. With the small sizes (the CPU default) a reduced config, batch 8, and
"mid" (image 32, 3 channels, 4 layers per level, 4 residual blocks, n_mlp 2, hidden 128),
batch 16. The optimizer is AdamW's fused implementation where torch has one for the device
(the trainer's choice too), so that the step times the model rather than a Python loop
over thousands of parameter tensors.

``torch.compile`` of the reference, RGFLOW_FAST_BENCH_COMPILE_MODEL:
    "regional" (default)  every conditioner MLP compiled (``module.compile()``), the RG
                          gather/coupling/scatter glue eager: the region that repeats is
                          traced once and shared by all its instances
    "full"                ``log_prob`` / the loss / ``inverse`` compiled whole: tracing the
                          paper config's thousands of layers takes over 15 minutes on 2 CPU
                          cores, so not the default
    "off"                 no compiled model cases
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import rgflow_fast as rf
from rgflow_fast.nets import ResidualMLP

import floors
import harness as bench

# config name -> (RGFlow arguments, batch)
if bench.SIZES == "paper":
    CONFIGS = {
        "paper_celeba": (dict(image_size=32, channels=3), 64),
        "msds": (dict(image_size=32, channels=3, n_layers=4), 64),
    }
else:
    CONFIGS = {
        "small": (dict(image_size=16, channels=3, n_layers=(2, 1, 1), n_res_blocks=1, hidden=64), 8),
        # the CPU target: 29.9 GFLOP per training step
        "mid": (dict(image_size=32, channels=3, n_layers=4, n_res_blocks=4, n_mlp=2, hidden=128), 16),
    }
CASES = ("log_prob", "train_step", "sample")
DTYPE = torch.float32
# Relative error ‖out - ref‖ / ‖ref‖ allowed in float32 after the whole flow.
REL_TOL = 1e-4
COMPILE_MODEL = os.environ.get("RGFLOW_FAST_BENCH_COMPILE_MODEL", "regional")
if COMPILE_MODEL not in ("regional", "full", "off"):
    raise ValueError(f"RGFLOW_FAST_BENCH_COMPILE_MODEL must be 'regional', 'full' or 'off'; got {COMPILE_MODEL!r}")
LR, WEIGHT_DECAY, CLIP = 1e-3, 5e-5, 1.0
# Every compiled MLP shares one code object, whose graphs differ by grad mode and row count;
# past dynamo's default limit of 8 it would fall back to eager and time that as "compiled".
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
setattr(torch._dynamo.config, _LIMIT, 64)

_SEED = int.from_bytes(os.urandom(4), "little")
_MODELS: dict = {}


def _model(config_name):
    """The config's model with perturbed weights (a fresh flow is the identity), built once."""
    if config_name not in _MODELS:
        torch.manual_seed(_SEED)
        model = rf.RGFlow(**CONFIGS[config_name][0])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.check_inputs = False  # its finiteness check syncs the device on every call
        _MODELS[config_name] = model.to(bench.DEVICE, DTYPE)
    return _MODELS[config_name]


def _data(model, batch):
    g = torch.Generator().manual_seed(_SEED + 1)
    shape = (batch, model.channels, model.image_size, model.image_size)
    return torch.randn(shape, generator=g, dtype=DTYPE).to(bench.DEVICE)


def _rel_err(actual, expected):
    return float((actual - expected).norm() / expected.norm())


def _check(actual, expected, what):
    err = _rel_err(actual, expected)
    assert err < REL_TOL, f"{what}: relative error {err:.2e} >= {REL_TOL:.0e} against the reference"


def _as_run(model, backend):
    """The model ``backend`` runs, and a wrapper for the function it calls: for the compiled
    reference a copy of the model, compiled per RGFLOW_FAST_BENCH_COMPILE_MODEL."""
    if backend != bench.COMPILED:
        return model, lambda f: f
    model = copy.deepcopy(model)
    if COMPILE_MODEL == "full":
        return model, torch.compile
    for module in model.modules():
        if isinstance(module, ResidualMLP):
            module.compile()
    return model, lambda f: f


def _log_prob_case(model, backend, x):
    model, wrap = _as_run(model, backend)
    f = wrap(model.log_prob)

    def run():
        with torch.no_grad():
            return f(x)

    return run, run


def _sample_case(model, backend, x):
    model, wrap = _as_run(model, backend)
    inverse = wrap(model.inverse)
    generator = torch.Generator(bench.DEVICE)

    def run():
        # model.sample(n) is prior.sample + inverse; spelled out so that "full" compiles inverse
        with torch.no_grad():
            return inverse(model.prior.sample(x.shape[0], generator=generator))[0]

    def check():
        generator.manual_seed(_SEED + 2)
        return run()

    return run, check


def _train_case(model, backend, x):
    model, wrap = _as_run(copy.deepcopy(model), backend)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    loss_fn = wrap(lambda v: -model.log_prob(v).mean())

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        return loss

    def check():
        # loss and gradients of the first step, before the optimizer moves the weights
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        return torch.cat([loss.detach().reshape(1)] + [p.grad.reshape(-1) for p in params])

    return run, check


_CASES = {"log_prob": _log_prob_case, "sample": _sample_case, "train_step": _train_case}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", CASES)
@bench.case_backends()
def test_model(benchmark, case, config, backend):
    if backend == bench.COMPILED and COMPILE_MODEL == "off":
        pytest.skip("RGFLOW_FAST_BENCH_COMPILE_MODEL=off: compiled model cases left out")
    model = _model(config)
    batch = CONFIGS[config][1]
    x = _data(model, batch)
    bench.require_backend(backend, x)
    with bench.use(bench.REFERENCE):
        expected = _CASES[case](model, bench.REFERENCE, x)[1]()
    with bench.use(backend):
        run, check = _CASES[case](model, backend, x)
        _check(check(), expected, f"{case} on {backend}")
        bench.run_case(benchmark, run, name=f"{case}_{config}", backend=backend, size=config,
                       dtype=DTYPE, flops=floors.model_flops(case, model.config, batch))


_MEMORY_PROBE = """
import json, sys, torch
import rgflow_fast as rf
torch.manual_seed(0)
config, batch, memory_efficient = json.loads(sys.argv[1])
model = rf.RGFlow(**config, memory_efficient=memory_efficient)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
x = torch.randn(batch, model.channels, model.image_size, model.image_size)

def step():
    opt.zero_grad(set_to_none=True)
    (-model.log_prob(x).mean()).backward()
    opt.step()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

step()  # warm-up: optimizer state, extension, allocator
opt.zero_grad(set_to_none=True)
if "cpp" in rf.available_backends():  # the freed activation blocks it keeps for the next step
    rf.cpp_ops.empty_activation_cache()
baseline = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak (VmHWM) from the current RSS
step()
print(json.dumps({"growth": status("VmHWM:") - baseline}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-RSS reset")
@pytest.mark.parametrize("config", ["mid"] if "mid" in CONFIGS else list(CONFIGS)[:1])
def test_memory_efficient_training_peak(config):
    """Peak RSS growth of a batch-64 training step above a warmed-up baseline, ordinary and
    ``memory_efficient=True``, each in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (glibc
    otherwise keeps freed blocks, and the peak would say nothing about live tensors)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    growth = {}
    for memory_efficient in (False, True):
        args = json.dumps([CONFIGS[config][0], 64, memory_efficient])
        out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, args], env=env, check=True,
                             capture_output=True, text=True).stdout
        growth[memory_efficient] = json.loads(out.strip().splitlines()[-1])["growth"]
    ratio = growth[True] / growth[False]
    print(f"{config}, batch 64: peak RSS growth {growth[False] / 2**20:.0f} MiB ordinary, "
          f"{growth[True] / 2**20:.0f} MiB memory_efficient (ratio {ratio:.2f})")
    assert ratio <= 0.5, growth
