"""Shared machinery of the benchmark suites (``python -m pytest benchmarks/``).

Every case runs each backend side by side: ``"torch"`` (the reference) first, then
``"torch_compile"`` (``torch.compile`` of the reference) and every other backend that
:func:`rgflow_fast.available_backends` lists at run time. Each case checks its result
against the reference before timing, then times with pytest-benchmark's pedantic mode
(warm-up rounds first; on CUDA the timer synchronises the device, so a round is the
device time of ``iterations`` calls). ``extra_info`` records the byte/FLOP model, the
achieved GB/s or TFLOP/s, the floor and the fraction of it reached, the speedup over the
reference measured in this same session, and (CUDA) the peak memory of one call.

Environment:
    RGFLOW_FAST_BENCH_DEVICE   "cpu" or "cuda" (default: cuda when present)
    RGFLOW_FAST_BENCH_SIZES    "small" or "paper" (default: paper on cuda, small on cpu)
    RGFLOW_FAST_BENCH_BUDGET   seconds of timed rounds per case (default 1.0)
    RGFLOW_FAST_BENCH_THREADS  CPU threads for torch (default: torch's own); on a shared CPU
                               use 1, since OpenMP's barriers stall when another process
                               holds a core (a 0.7 ms gather measured 24 ms on 2 threads)
"""
from __future__ import annotations

import math
import os
import platform
import time

import pytest
import torch

import rgflow_fast as rf
from rgflow_fast import backends

import floors

REFERENCE = "torch"
COMPILED = "torch_compile"


def _device() -> torch.device:
    name = os.environ.get("RGFLOW_FAST_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"RGFLOW_FAST_BENCH_DEVICE must be 'cpu' or 'cuda'; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("RGFLOW_FAST_BENCH_DEVICE=cuda but torch sees no CUDA device; use 'cpu'")
    return torch.device(name)


DEVICE = _device()
SIZES = os.environ.get("RGFLOW_FAST_BENCH_SIZES", "paper" if DEVICE.type == "cuda" else "small")
if SIZES not in ("small", "paper"):
    raise ValueError(f"RGFLOW_FAST_BENCH_SIZES must be 'small' or 'paper'; got {SIZES!r}")
BUDGET_S = float(os.environ.get("RGFLOW_FAST_BENCH_BUDGET", "1.0"))
if os.environ.get("RGFLOW_FAST_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["RGFLOW_FAST_BENCH_THREADS"]))
# The reference first, so that every other backend's speedup is known when it is timed.
BACKENDS = [REFERENCE, COMPILED] + [b for b in rf.available_backends() if b != REFERENCE]


def _measure_device() -> dict:
    """Ceilings measured once per session, and the peaks the floors use: the datasheet's
    for a known GPU, else the measured ones (a CPU has no datasheet entry here)."""
    name = floors.device_name(DEVICE)
    copy = floors.measure_copy_gbps(DEVICE)
    matmul = floors.measure_matmul_tflops(DEVICE, torch.float32)
    peak = floors.known_peak(name) if DEVICE.type == "cuda" else None
    if peak is not None:
        source, bandwidth, tflops = f"datasheet ({peak.name})", peak.bandwidth_gbps, dict(peak.tflops)
    else:
        source, bandwidth = "measured", copy
        tflops = {floors.matmul_precision(torch.float32, DEVICE.type): matmul}
    products = None  # the float product kernel of the C++ layer (csrc/rg_coupling_layer.cpp)
    if DEVICE.type == "cpu" and "cpp" in rf.available_backends():
        forced = os.environ.get("RGFLOW_FAST_CPU_PRODUCTS", "auto")
        products = forced if forced != "auto" else torch.ops.rgflow_fast.rg_coupling_layer_cpu_products()[0]
    return {
        "device": name,
        "device_type": DEVICE.type,
        "cpu_threads": torch.get_num_threads(),
        "cpu_products": products,
        "sizes": SIZES,
        "measured_copy_gbps": copy,
        "measured_matmul_tflops_fp32": matmul,
        "peak_source": source,
        "peak_bandwidth_gbps": bandwidth,
        "peak_tflops": tflops,
    }


_DEVICE_INFO: dict = {}


def device_info() -> dict:
    if not _DEVICE_INFO:
        _DEVICE_INFO.update(_measure_device())
    return _DEVICE_INFO


def environment() -> dict:
    """Versions and device facts the results file carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        **device_info(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "rgflow_fast": rf.__version__,
        "backends": rf.available_backends(),
    }


def use(backend: str):
    """Context for running ``backend`` (the compiled case runs the reference)."""
    return rf.use_backend(REFERENCE if backend == COMPILED else backend)


def require_backend(backend: str, like: torch.Tensor) -> None:
    """Skip, with the reason, a backend that cannot run on ``like``'s device and dtype."""
    if backend == "triton" and like.device.type == "cpu":
        pytest.skip("triton on the CPU runs only in the interpreter, a correctness tool, not timed")
    if backend in (REFERENCE, COMPILED):
        return
    with rf.use_backend(backend):
        try:
            backends.resolve(like)
        except RuntimeError as exc:
            pytest.skip(str(exc))


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _synced_timer():
    # Wait for queued device work so that a round covers the device time of its calls.
    torch.cuda.synchronize()
    return time.perf_counter()


def assert_close(actual, expected, *, rtol, atol, what):
    """Every tensor of ``actual`` matches ``expected`` (nested tuples allowed)."""
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
        return
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, rtol=rtol, atol=atol, what=f"{what}[{i}]")


_MEDIANS: dict = {}


def run_case(benchmark, fn, *, name, backend, size, dtype, nbytes=None, flops=None):
    """Time ``fn`` (already checked against the reference) and fill ``extra_info``.

    ``name`` is the result's name, shared by every backend of the case; ``nbytes`` /
    ``flops`` the case's byte / FLOP model (:mod:`floors`).
    """
    info = device_info()
    benchmark.group = name
    peak_mib = call_mib = None
    if DEVICE.type == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
    fn()  # warm-up: compiles, JIT builds, caches
    synchronize()
    if DEVICE.type == "cuda":
        # the process's peak (everything live, inputs and models included), and the part of
        # it above what was allocated before the call
        peak = torch.cuda.max_memory_allocated(DEVICE)
        peak_mib, call_mib = peak / 2**20, (peak - before) / 2**20
    start = time.perf_counter()
    fn()
    synchronize()
    once = max(time.perf_counter() - start, 1e-7)
    # Rounds of >= 1 ms (>= 20 us on the CPU) so timer and sync costs stay small.
    iterations = max(1, min(1000, math.ceil((1e-3 if DEVICE.type == "cuda" else 2e-5) / once)))
    rounds = max(5, min(200, int(BUDGET_S / (once * iterations))))
    if DEVICE.type == "cuda":
        # pytest-benchmark reads the timer from this attribute when it builds each round.
        benchmark._timer = _synced_timer
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=2)
    extra = {"name": name, "backend": backend, "size": size, "dtype": str(dtype).removeprefix("torch."),
             "device": info["device"], "peak_mem_mib": peak_mib, "call_mem_mib": call_mib}
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        if backend == REFERENCE:
            _MEDIANS[name] = median
        if name in _MEDIANS:
            extra["speedup_vs_torch"] = _MEDIANS[name] / median
        precision = floors.matmul_precision(dtype, DEVICE.type)
        extra.update(floors.roofline(
            median, nbytes=nbytes, flops=flops, bandwidth_gbps=info["peak_bandwidth_gbps"],
            peak_tflops=info["peak_tflops"].get(precision) if flops is not None else None))
        if flops is not None:
            extra["math_mode"] = precision
    benchmark.extra_info.update(extra)


def case_backends():
    """``pytest.mark.parametrize`` over every backend of this run, reference first."""
    return pytest.mark.parametrize("backend", BACKENDS)
