#!/usr/bin/env python
"""One-call runner for a GPU machine with no network (the package's own deps installed).

    python benchmarks/run_gpu.py --phase all [--out DIR] [--commit SHA]

Phases (each meant to finish in under 8 minutes on a fresh machine, so each fits one remote
call; run them separately with --phase):

    build        pip install --no-build-isolation --no-deps --no-index -e . ; load every
                 backend and run each once on a small tensor of the device, so that JIT
                 extensions and Triton kernels are built (cached under build/)
    aot          python -m rgflow_fast.kernels.aot --arch <this GPU's> --quick: registers,
                 spills, shared memory and tensor-core instructions of the Triton kernels as
                 this machine's Triton and ptxas build them (<stem>-aot.log)
    tests        python -m pytest tests/ ; the output goes to <stem>-tests.log
    bench-ops    python -m pytest benchmarks/test_rg_coupling.py --benchmark-json ...
    bench-model  python -m pytest benchmarks/test_model.py --benchmark-json ...
    bench-layer  the fused coupling layer per precision mode, forward and forward+backward,
                 batch 64 and 512 (benchmarks/test_rg_coupling_layer_gpu.py -k test_layer)
    bench-step   the paper training step per precision mode, eager and as a CUDA graph,
                 batch 64 and 512 (benchmarks/test_rg_coupling_layer_gpu.py -k test_train_step)
    bench        bench-ops, bench-model, bench-layer, bench-step, then report
    report       pytest-benchmark json files -> <stem>.json (results) + <stem>.md (table)
    all          build, tests, bench

``<stem>`` is ``<date>-<device>``, e.g. ``2026-11-23-nvidia-h100-80gb-hbm3``. Files go to
benchmarks/results/ (or --results) and, when --out or $OUT names a folder, are copied there too.
``--device cpu`` runs the benchmark phases on the CPU (the CPU suite's sizes). The commit
is --commit, else ``git rev-parse HEAD`` (``-dirty`` if the tree has changes), else the
one pytest-benchmark recorded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PHASE_TIMEOUT_S = 470
# benchmark suite -> pytest arguments (each suite is one phase, one pytest session, one json)
SUITES = {
    "ops": ["benchmarks/test_rg_coupling.py"],
    "model": ["benchmarks/test_model.py"],
    "layer": ["benchmarks/test_rg_coupling_layer_gpu.py", "-k", "test_layer"],
    "step": ["benchmarks/test_rg_coupling_layer_gpu.py", "-k", "test_train_step"],
}
BACKEND_ORDER = ("torch", "torch_compile", "triton", "cuda", "cpp")


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_name(device: str) -> str:
    """Name of ``device`` ("cuda" or "cpu"), read in a subprocess after the build."""
    code = "import sys; sys.path.insert(0, 'benchmarks'); import floors; print(floors.device_name(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, device], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


# ---------------------------------------------------------------- conversion


def _order(backend: str) -> tuple:
    return (BACKEND_ORDER.index(backend) if backend in BACKEND_ORDER else len(BACKEND_ORDER), backend)


def convert(runs: list[dict], commit: str | None = None, date: str | None = None) -> dict:
    """pytest-benchmark json documents (one per pytest session) -> the results document.

    Each result is ``{name, backend, median_ms, speedup_vs_torch, ...}``; the speedup is the
    reference's median over this one's, both from the same session (the same document).
    """
    if not runs:
        raise ValueError("no pytest-benchmark json given: run the bench phases first")
    envs = [run.get("machine_info", {}).get("rgflow_fast") for run in runs]
    if any(env is None for env in envs):
        raise ValueError("a benchmark json lacks machine_info['rgflow_fast']: it was not "
                         "written by `python -m pytest benchmarks/ --benchmark-json=...`")
    devices = {env["device"] for env in envs}
    if len(devices) != 1:
        raise ValueError(f"benchmark jsons come from different devices {sorted(devices)}; "
                         f"convert each device's separately")
    results, skipped = [], []
    for run in runs:
        medians = {}
        rows = []
        for b in run["benchmarks"]:
            info = b["extra_info"]
            median = b["stats"]["median"]
            if info["backend"] == "torch":
                medians[info["name"]] = median
            rows.append((b, info, median))
        for b, info, median in rows:
            ref = medians.get(info["name"])
            stats = b["stats"]
            result = {
                "name": info["name"],
                "backend": info["backend"],
                "median_ms": median * 1e3,
                "speedup_vs_torch": ref / median if ref is not None else None,
                "iqr_ms": stats["iqr"] * 1e3,
                "min_ms": stats["min"] * 1e3,
                "rounds": stats["rounds"],
                "iterations": stats.get("iterations", 1),
            }
            for key in ("size", "dtype", "peak_mem_mib", "call_mem_mib", "bytes", "gbps", "flops",
                        "tflops", "math_mode", "bound", "floor_ms", "roofline_fraction"):
                if info.get(key) is not None:
                    result[key] = info[key]
            results.append(result)
        skipped += run.get("rgflow_fast_skipped", [])
    results.sort(key=lambda r: (r["name"], _order(r["backend"])))
    env = envs[0]
    commit = commit or runs[0].get("commit_info", {}).get("id") or "unknown"
    if commit != "unknown" and runs[0].get("commit_info", {}).get("dirty") and "-dirty" not in commit:
        commit += "-dirty"
    dates = sorted(run.get("datetime", "") for run in runs)
    return {
        "date": date or (dates[-1][:10] if dates[-1] else datetime.date.today().isoformat()),
        "device": env["device"],
        "device_type": env["device_type"],
        "cpu_threads": env["cpu_threads"],
        "cpu_products": env.get("cpu_products"),
        "torch": env["torch"],
        "triton": env["triton"],
        "cuda": env["cuda"],
        "python": env["python"],
        "commit": commit,
        "backends": env["backends"],
        "sizes": env["sizes"],
        "ceilings": {
            "measured_copy_gbps": env["measured_copy_gbps"],
            "measured_matmul_tflops_fp32": env["measured_matmul_tflops_fp32"],
            "peak_source": env["peak_source"],
            "peak_bandwidth_gbps": env["peak_bandwidth_gbps"],
            "peak_tflops": env["peak_tflops"],
        },
        "results": results,
        "skipped": skipped,
    }


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown(doc: dict) -> str:
    """The results document as a markdown section: facts, then one row per result."""
    c = doc["ceilings"]
    peaks = ", ".join(f"{k} {v:.4g}" for k, v in c["peak_tflops"].items())
    lines = [
        f"### {doc['device']} — {doc['date']}, commit `{doc['commit']}`",
        "",
        f"torch {doc['torch']}, triton {doc['triton']}, CUDA {doc['cuda']}, python {doc['python']}; "
        f"backends {', '.join(doc['backends'])}; sizes \"{doc['sizes']}\"; "
        f"{doc['cpu_threads']} CPU thread(s) for torch"
        + (f"; C++ layer products: {doc['cpu_products']}." if doc.get("cpu_products") else "."),
        f"Floors from {c['peak_source']}: bandwidth {c['peak_bandwidth_gbps']:.4g} GB/s, "
        f"TFLOP/s {peaks}. Measured this run: copy {c['measured_copy_gbps']:.4g} GB/s, "
        f"fp32 matmul {c['measured_matmul_tflops_fp32']:.4g} TFLOP/s.",
        "",
        "| case | backend | median ms | speedup vs torch | achieved | floor ms | % of floor | peak MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        if "tflops" in r:
            achieved = f"{r['tflops']:.3g} TFLOP/s"
        elif "gbps" in r:
            achieved = f"{r['gbps']:.3g} GB/s"
        else:
            achieved = "—"
        fraction = r.get("roofline_fraction")
        lines.append(
            f"| {r['name']} | {r['backend']} | {r['median_ms']:.4g} | "
            f"{_fmt(r['speedup_vs_torch'], '.3g')} | {achieved} | {_fmt(r.get('floor_ms'), '.3g')} | "
            f"{_fmt(None if fraction is None else 100 * fraction, '.3g')} | "
            f"{_fmt(r.get('peak_mem_mib'), '.0f')} |"
        )
    if doc["skipped"]:
        reasons = sorted({s["reason"] for s in doc["skipped"]})
        lines += ["", f"Skipped cases ({len(doc['skipped'])}): " + "; ".join(reasons) + "."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- phases


class Runner:
    def __init__(self, args):
        self.device = args.device
        self.commit = args.commit or git_commit()
        self.out = Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
        self.timeout = args.timeout
        self.inputs = [Path(p) for p in args.inputs or []]
        self.date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions")))
        if args.device:
            self.env["RGFLOW_FAST_BENCH_DEVICE"] = args.device
        if args.threads:
            self.env["RGFLOW_FAST_BENCH_THREADS"] = str(args.threads)
        self._stem = None
        self.results = Path(args.results)
        self.results.mkdir(parents=True, exist_ok=True)

    @property
    def stem(self) -> str:
        if self._stem is None:
            device = self.device or ("cuda" if self._has_cuda() else "cpu")
            self._stem = f"{self.date}-{slug(device_name(device))}"
        return self._stem

    def _has_cuda(self) -> bool:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip() == "True"

    def publish(self, path: Path) -> None:
        print(f"wrote {path}")
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, self.out / path.name)
            print(f"wrote {self.out / path.name}")

    def command(self, cmd: list[str], log: Path) -> int:
        """Run ``cmd`` in the repo root, teeing its output to ``log`` (appended); returns its
        status, 124 if it outlived the time limit."""
        print(f"$ {' '.join(cmd)}", flush=True)
        start = time.time()
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            watchdog = threading.Timer(self.timeout, proc.kill)
            watchdog.start()
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            status = proc.wait()
            timed_out = not watchdog.is_alive()
            watchdog.cancel()
            status = 124 if timed_out else status
            note = f"[exit {status} after {time.time() - start:.0f} s"
            note += f"; killed at the {self.timeout} s limit]" if timed_out else "]"
            f.write(note + "\n")
        print(note, flush=True)
        return status

    def build(self) -> int:
        log = self.results / "build.log.tmp"
        log.unlink(missing_ok=True)
        status = self.command([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                               "--no-deps", "--no-index", "-e", "."], log)
        if status == 0:
            device = self.device or "auto"
            status = self.command([sys.executable, str(ROOT / "benchmarks" / "run_gpu.py"),
                                   "--phase", "warm-backends", "--device", device], log)
        final = self.results / f"{self.stem}-build.log"
        log.replace(final)
        self.publish(final)
        return status

    def aot(self) -> int:
        log = self.results / f"{self.stem}-aot.log"
        log.unlink(missing_ok=True)
        code = "import torch; major, minor = torch.cuda.get_device_capability(); print(10 * major + minor)"
        arch = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        status = self.command([sys.executable, "-m", "rgflow_fast.kernels.aot", "--arch", arch, "--quick",
                               "--out", str(ROOT / "build" / "aot")], log)
        self.publish(log)
        return status

    def tests(self) -> int:
        log = self.results / f"{self.stem}-tests.log"
        log.unlink(missing_ok=True)
        status = self.command([sys.executable, "-m", "pytest", "tests/", "-q", "-ra",
                               "-p", "no:cacheprovider"], log)
        self.publish(log)
        return status

    def bench_suite(self, suite: str) -> int:
        json_path = self.results / f"{self.stem}-{suite}.bench.json"
        log = self.results / f"{self.stem}-{suite}.log"
        log.unlink(missing_ok=True)
        status = self.command([sys.executable, "-m", "pytest", *SUITES[suite], "-q",
                               "-ra", "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
                               "--benchmark-columns=min,median,iqr,rounds,iterations"], log)
        self.publish(log)
        if json_path.exists():
            self.publish(json_path)
        return status

    def report(self) -> int:
        inputs = self.inputs or [p for p in (self.results / f"{self.stem}-{s}.bench.json" for s in SUITES)
                                 if p.exists()]
        if not inputs:
            print(f"no benchmark json for {self.stem} in {self.results}: run --phase bench first", file=sys.stderr)
            return 1
        doc = convert([json.loads(p.read_text()) for p in inputs], commit=self.commit)
        stem = f"{doc['date']}-{slug(doc['device'])}"
        json_path, md_path = self.results / f"{stem}.json", self.results / f"{stem}.md"
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
        md_path.write_text(markdown(doc))
        self.publish(json_path)
        self.publish(md_path)
        print(md_path.read_text())
        return 0


def warm_backends(device: str) -> int:
    """Load every backend and run each op once on ``device``, so JIT builds happen now."""
    import torch

    import rgflow_fast as rf
    from rgflow_fast import backends
    from rgflow_fast.backends import BACKENDS

    device = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}")
    x = torch.randn(2, 3, 16, 16, device=device)
    s, t = torch.randn(2, 2, 16, 3, 4, 4, device=device).unbind(1)
    s, t = s.reshape(-1, 3, 4, 4), t.reshape(-1, 3, 4, 4)
    available = rf.available_backends()
    failed = 0
    for name in BACKENDS:
        if name not in available:
            try:
                with rf.use_backend(name):
                    pass
            except RuntimeError as exc:
                print(f"backend {name}: {exc}")
            continue
        with rf.use_backend(name):
            try:
                backends.resolve(x)
            except RuntimeError as exc:
                print(f"backend {name}: not used on {device}: {exc}")
                continue
            start = time.time()
            try:
                leaf = x.clone().requires_grad_()
                y, ldj = rf.functional.rg_coupling(leaf, s, t, 4, 1, 2, 0)
                (y.sum() + ldj.sum()).backward()
                if device == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - report every failure, then go on
                print(f"backend {name}: FAILED on {device}: {type(exc).__name__}: {exc}")
                failed += 1
                continue
            print(f"backend {name}: ready on {device} ({time.time() - start:.1f} s to first result)")
    if device == "cuda":
        failed += warm_fused_layer()
    return 1 if failed else 0


def warm_fused_layer() -> int:
    """Compile the fused layer's Triton kernels (each precision mode, forward, backward and
    inverse at the paper config) into Triton's cache, so the benchmark phases do not time it."""
    import torch

    try:
        from rgflow_fast import triton_layer
    except ImportError as exc:
        print(f"fused layer: not importable: {exc}")
        return 1
    D, hidden, n_res, n_mlp = 48, 512, 4, 2
    widths = [D] + [hidden] * n_mlp + [D]
    params = []
    for _ in range(2):
        for _ in range(n_res):
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                params += [torch.ones(w_in), torch.randn(w_out, w_in), torch.ones(w_out, 1), torch.zeros(w_out)]
        params.append(torch.zeros(D))
    params = [p.cuda().requires_grad_() for p in params]
    u = torch.randn(128, 3, 4, 4, device="cuda", requires_grad=True)
    ldj = torch.zeros(2, device="cuda")
    failed = 0
    for precision in triton_layer.PRECISIONS:
        start = time.time()
        try:
            for recompute in (False, True):
                y, out = triton_layer.rg_coupling_layer(u, ldj, params, n_mlp, False, recompute, precision)
                (y.sum() + out.sum()).backward()
            with torch.no_grad():
                triton_layer.rg_coupling_layer(y, out, params, n_mlp, True, False, precision)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - report every failure, then go on
            print(f"fused layer {precision}: FAILED: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        print(f"fused layer {precision}: ready ({time.time() - start:.1f} s to compile and run)")
    return failed


PHASES = {
    "build": ["build"],
    "aot": ["aot"],
    "tests": ["tests"],
    "bench-ops": ["bench-ops"],
    "bench-model": ["bench-model"],
    "bench-layer": ["bench-layer"],
    "bench-step": ["bench-step"],
    "bench": ["bench-ops", "bench-model", "bench-layer", "bench-step", "report"],
    "report": ["report"],
    "all": ["build", "aot", "tests", "bench-ops", "bench-model", "bench-layer", "bench-step", "report"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", default="all", choices=list(PHASES) + ["warm-backends"])
    parser.add_argument("--out", help="folder to copy the files into as well (default: $OUT if set)")
    parser.add_argument("--device", choices=["cuda", "cpu", "auto"],
                        help="device the benchmarks run on (default: cuda when present)")
    parser.add_argument("--threads", type=int, help="CPU threads for the benchmarks (default: torch's own)")
    parser.add_argument("--commit", help="commit to record (default: git rev-parse HEAD)")
    parser.add_argument("--timeout", type=int, default=PHASE_TIMEOUT_S,
                        help=f"seconds allowed to each command (default {PHASE_TIMEOUT_S})")
    parser.add_argument("--inputs", nargs="*", help="report: pytest-benchmark json files to convert")
    parser.add_argument("--results", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.phase == "warm-backends":
        return warm_backends(args.device or "auto")
    if args.device == "auto":
        args.device = None
    runner = Runner(args)
    steps = {"build": runner.build, "aot": runner.aot, "tests": runner.tests, "report": runner.report,
             **{f"bench-{suite}": (lambda suite=suite: runner.bench_suite(suite)) for suite in SUITES}}
    statuses = {}
    for step in PHASES[args.phase]:
        print(f"=== {step}", flush=True)
        statuses[step] = steps[step]()
    print("=== status: " + ", ".join(f"{k} {'ok' if v == 0 else f'FAILED ({v})'}" for k, v in statuses.items()))
    return 0 if all(v == 0 for v in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
