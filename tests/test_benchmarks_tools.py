"""The benchmark tooling: byte/FLOP models and peaks (benchmarks/floors.py), and the
conversion of pytest-benchmark json to the results json + markdown (benchmarks/run_gpu.py).
Expected values are counted by hand here, or by torch's own FLOP counter."""
import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rgflow_fast as rf

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"rgflow_fast_benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


floors = _load("floors")
run_gpu = _load("run_gpu")

PAPER = {"image_size": 32, "channels": 3, "kernel_size": 4, "n_layers": [8, 6, 4, 2],
         "n_res_blocks": [4] * 4, "n_mlp": [2] * 4, "hidden": [512] * 4}


def test_op_bytes_level0_paper_block():
    # 64 images 3x32x32, k=4, d=1: 8x8 patches cover every pixel once; 4-byte floats
    shape = floors.OpShape(64, 3, 32, 4, 1, 2)
    image = 64 * 3 * 32 * 32
    assert (shape.image, shape.patches, shape.half) == (image, image, image // 2)
    assert floors.op_bytes("gather", shape) == 2 * image * 4
    assert floors.op_bytes("scatter", shape) == 2 * image * 4
    # x all + s,t half each + y all + ldj
    assert floors.op_bytes("coupling_forward", shape) == (image + image + image + 64) * 4
    assert floors.op_bytes("coupling_inverse", shape) == (image + image + image + 64) * 4
    # grad_y + grad_ldj + x,s half each + grad_x + grad_s, grad_t in full
    assert floors.op_bytes("coupling_backward", shape) == (image + 64 + image + image + 2 * image) * 4


def test_op_bytes_dilated_block_and_dtype():
    # level 1 (d=2) of a 32x32 image: 4x4 patches of 4x4 touch a quarter of the pixels
    shape = floors.OpShape(2, 3, 32, 4, 2, 4, torch.float64)
    image, patches = 2 * 3 * 32 * 32, 2 * 16 * 3 * 16
    assert (shape.image, shape.patches) == (image, patches)
    assert floors.op_bytes("gather", shape) == 2 * patches * 8
    assert floors.op_bytes("scatter", shape) == (patches + (image - patches) + image) * 8
    assert floors.op_bytes("coupling_forward", shape) == (2 * image + patches + 2) * 8


def test_op_bytes_rejects_unknown_op_and_bad_geometry():
    with pytest.raises(ValueError, match="unknown op"):
        floors.op_bytes("gatherr", floors.OpShape(1, 1, 8, 4, 1, 0))
    with pytest.raises(ValueError, match="multiple of kernel_size"):
        floors.OpShape(1, 1, 12, 4, 2, 0)


def test_paper_forward_flops_match_design_count():
    # 1,252 patch-layer evaluations per image, each 4 MLP passes (2 steps x s,t nets) of
    # 4 residual blocks 48 -> 512 -> 512 -> 48 (the paper config: 12.5 GFLOP per image)
    per_block = 2 * (48 * 512 + 512 * 512 + 512 * 48)
    assert floors.model_forward_flops(PAPER, 1) == 1252 * 4 * 4 * per_block
    assert floors.model_flops("train_step", PAPER, 64) == 3 * 64 * 1252 * 4 * 4 * per_block
    assert math.isclose(floors.model_flops("train_step", PAPER, 64) / 1e12, 2.39, rel_tol=0.01)
    assert floors.model_flops("sample", PAPER, 5) == floors.model_flops("log_prob", PAPER, 5)
    with pytest.raises(ValueError, match="unknown model case"):
        floors.model_flops("train", PAPER, 1)


def test_model_flops_equal_torch_flop_counter(seed):
    # torch counts every matmul the reference model runs, forward and backward
    model = rf.RGFlow(8, 2, n_layers=(2, 1), n_res_blocks=(1, 2), n_mlp=(2, 1), hidden=(6, 5))
    x = torch.randn(3, 2, 8, 8)
    with rf.use_backend("torch"):
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                model.log_prob(x)
        with FlopCounterMode(display=False) as step:
            (-model.log_prob(x).mean()).backward()
    assert forward.get_total_flops() == floors.model_flops("log_prob", model.config, 3)
    assert step.get_total_flops() == floors.model_flops("train_step", model.config, 3)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", ("H100", 3350.0, 66.9)),
    ("NVIDIA H100 PCIe", ("H100 PCIe", 2000.0, 51.2)),
    ("NVIDIA H100 NVL", ("H100 NVL", 3900.0, 60.0)),
    ("NVIDIA H200", ("H200", 4800.0, 66.9)),
    ("NVIDIA H200 NVL", ("H200 NVL", 4800.0, 60.0)),
])
def test_known_peak_picks_the_most_specific_entry(name, expected):
    peak = floors.known_peak(name)
    assert (peak.name, peak.bandwidth_gbps, peak.tflops["fp32"]) == expected
    assert peak.tflops["bf16"] > peak.tflops["tf32"] > peak.tflops["fp32"]


def test_known_peak_unknown_device():
    assert floors.known_peak("NVIDIA A100-SXM4-80GB") is None
    assert floors.known_peak("AMD EPYC 7B13") is None


def test_matmul_precision():
    assert floors.matmul_precision(torch.bfloat16, "cuda") == "bf16"
    assert floors.matmul_precision(torch.float32, "cpu") == "fp32"
    assert floors.matmul_precision(torch.float64, "cuda") == "fp64"


def test_roofline_memory_and_compute_bound():
    # 3 MB in 1 ms at 3000 GB/s: 1 GB/s achieved, floor 1 us, 0.1 % of it
    mem = floors.roofline(1e-3, nbytes=3_000_000, bandwidth_gbps=3000.0)
    assert mem["gbps"] == pytest.approx(3.0)
    assert mem["bound"] == "memory"
    assert mem["floor_ms"] == pytest.approx(1e-3)
    assert mem["roofline_fraction"] == pytest.approx(1e-3)
    # 2 TFLOP in 10 s at 400 TFLOP/s: floor 5 ms; its 1 MB at 1000 GB/s is 1 us
    both = floors.roofline(10.0, nbytes=1_000_000, flops=2_000_000_000_000,
                           bandwidth_gbps=1000.0, peak_tflops=400.0)
    assert both["bound"] == "compute"
    assert both["tflops"] == pytest.approx(0.2)
    assert both["floor_ms"] == pytest.approx(5.0)
    assert both["roofline_fraction"] == pytest.approx(5e-4)
    # without a peak: rates only
    assert set(floors.roofline(2.0, flops=10)) == {"flops", "tflops"}
    with pytest.raises(ValueError, match="positive"):
        floors.roofline(0.0, nbytes=1)


def test_measured_ceilings_are_positive_rates():
    assert 0 < floors.measure_copy_gbps("cpu", megabytes=4, repeats=3) < math.inf
    assert 0 < floors.measure_matmul_tflops("cpu", n=64, repeats=3) < math.inf
    assert floors.device_name("cpu")


ENV = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "cpu_threads": 16, "sizes": "paper",
       "measured_copy_gbps": 2900.0, "measured_matmul_tflops_fp32": 50.0,
       "peak_source": "datasheet (H100)", "peak_bandwidth_gbps": 3350.0,
       "peak_tflops": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
       "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0", "python": "3.12.3",
       "rgflow_fast": "0.1.0", "backends": ["torch", "triton"]}


def _bench(name, backend, median, **extra):
    stats = {"median": median, "iqr": median / 10, "min": median * 0.9, "rounds": 20, "iterations": 3}
    info = {"name": name, "backend": backend, "size": "paper", "dtype": "float32",
            "peak_mem_mib": 12.5, **extra}
    return {"name": f"test[{backend}-{name}]", "stats": stats, "extra_info": info}


def _run(benchmarks, env=ENV, skipped=()):
    return {"machine_info": {"rgflow_fast": env}, "commit_info": {"id": "f00d", "dirty": False},
            "datetime": "2026-11-23T10:00:00.000000+00:00", "benchmarks": benchmarks,
            "rgflow_fast_skipped": list(skipped)}


def test_convert_speedups_from_the_same_run():
    ops = _run([
        _bench("coupling_forward_paper", "triton", 0.001, gbps=2000.0, floor_ms=0.7, roofline_fraction=0.7),
        _bench("coupling_forward_paper", "torch", 0.004, gbps=500.0),
        _bench("coupling_forward_paper", "torch_compile", 0.002),
    ], skipped=[{"test": "t[cpp]", "reason": "backend 'cpp' cannot run on cuda"}])
    model = _run([_bench("train_step_paper_celeba", "torch", 0.5, tflops=4.8, math_mode="fp32"),
                  _bench("train_step_paper_celeba", "triton", 0.25, tflops=9.6)])
    doc = run_gpu.convert([ops, model], commit="abc123")
    assert (doc["device"], doc["commit"], doc["date"]) == ("NVIDIA H100 80GB HBM3", "abc123", "2026-11-23")
    assert (doc["torch"], doc["triton"], doc["cuda"]) == ("2.11.0+cu130", "3.6.0", "13.0")
    rows = {(r["name"], r["backend"]): r for r in doc["results"]}
    assert [(r["name"], r["backend"]) for r in doc["results"]] == [
        ("coupling_forward_paper", "torch"), ("coupling_forward_paper", "torch_compile"),
        ("coupling_forward_paper", "triton"),
        ("train_step_paper_celeba", "torch"), ("train_step_paper_celeba", "triton")]
    fwd = rows["coupling_forward_paper", "triton"]
    assert fwd["median_ms"] == pytest.approx(1.0)
    assert fwd["speedup_vs_torch"] == pytest.approx(4.0)
    assert (fwd["gbps"], fwd["roofline_fraction"], fwd["peak_mem_mib"]) == (2000.0, 0.7, 12.5)
    assert (fwd["rounds"], fwd["iterations"]) == (20, 3)
    assert rows["coupling_forward_paper", "torch_compile"]["speedup_vs_torch"] == pytest.approx(2.0)
    assert rows["coupling_forward_paper", "torch"]["speedup_vs_torch"] == pytest.approx(1.0)
    assert rows["train_step_paper_celeba", "triton"]["speedup_vs_torch"] == pytest.approx(2.0)
    assert doc["skipped"] == [{"test": "t[cpp]", "reason": "backend 'cpp' cannot run on cuda"}]
    json.dumps(doc)  # serialisable


def test_convert_never_pairs_across_runs():
    # a reference timed in another session gives no speedup
    alone = _run([_bench("gather_paper", "triton", 0.001)])
    doc = run_gpu.convert([alone, _run([_bench("gather_paper", "torch", 0.004)])])
    triton = next(r for r in doc["results"] if r["backend"] == "triton")
    assert triton["speedup_vs_torch"] is None
    assert doc["commit"] == "f00d"


def test_convert_rejects_bad_input():
    with pytest.raises(ValueError, match="no pytest-benchmark json"):
        run_gpu.convert([])
    with pytest.raises(ValueError, match="machine_info"):
        run_gpu.convert([{"benchmarks": [], "machine_info": {}}])
    other = dict(ENV, device="NVIDIA H200")
    with pytest.raises(ValueError, match="different devices"):
        run_gpu.convert([_run([]), _run([], env=other)])


def test_markdown_table():
    doc = run_gpu.convert([_run([_bench("gather_paper", "torch", 0.004, gbps=0.5),
                                 _bench("gather_paper", "cuda", 0.002, gbps=1.0, floor_ms=0.001,
                                        roofline_fraction=0.5)])], commit="abc")
    md = run_gpu.markdown(doc)
    assert "NVIDIA H100 80GB HBM3 — 2026-11-23, commit `abc`" in md
    assert "| gather_paper | torch | 4 | 1 | 0.5 GB/s | — | — | 12 |" in md
    assert "| gather_paper | cuda | 2 | 2 | 1 GB/s | 0.001 | 50 | 12 |" in md


def test_report_phase_writes_results_and_copies(tmp_path):
    bench_json = tmp_path / "ops.bench.json"
    bench_json.write_text(json.dumps(_run([_bench("scatter_paper", "torch", 0.003)])))
    results, out = tmp_path / "results", tmp_path / "out"
    status = run_gpu.main(["--phase", "report", "--inputs", str(bench_json), "--results", str(results),
                           "--out", str(out), "--commit", "c0ffee"])
    assert status == 0
    stem = "2026-11-23-nvidia-h100-80gb-hbm3"
    doc = json.loads((results / f"{stem}.json").read_text())
    assert doc["commit"] == "c0ffee"
    assert doc["results"][0]["name"] == "scatter_paper"
    assert (out / f"{stem}.json").read_text() == (results / f"{stem}.json").read_text()
    assert "| scatter_paper | torch | 3 |" in (out / f"{stem}.md").read_text()


def test_slug():
    assert run_gpu.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert run_gpu.slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"


def test_runner_command_logs_and_enforces_its_time_limit(tmp_path):
    runner = run_gpu.Runner(argparse.Namespace(
        device=None, threads=None, commit="x", out=None, timeout=2, inputs=None, results=str(tmp_path)))
    log = tmp_path / "cmd.log"
    assert runner.command([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], log) == 3
    assert "hello" in log.read_text() and "[exit 3 after" in log.read_text()
    slow = [sys.executable, "-c", "import time; print('start', flush=True); time.sleep(30)"]
    assert runner.command(slow, log) == 124
    assert "killed at the 2 s limit" in log.read_text()
