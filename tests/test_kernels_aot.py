"""Ahead-of-time compilation of the Triton kernels for real GPUs, on a machine without one
(``python -m rgflow_fast.kernels.aot``): every configuration compiles, none spills, and the
layer kernels' TF32 and bf16 modes run on tensor cores (HMMA/HGMMA in the SASS)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
if not (BIN / "cuobjdump").exists():
    pytest.skip(f"Triton ships no cuobjdump in {BIN}", allow_module_level=True)

ROW = re.compile(r"^(_\w+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


def run_aot(tmp_path, *args, timeout):
    # a fresh process: the kernels must be compiled, not interpreted (conftest sets
    # TRITON_INTERPRET=1 for this process on a machine without CUDA)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "cubins"
    proc = subprocess.run([sys.executable, "-m", "rgflow_fast.kernels.aot", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    rows = [m.groups() for m in map(ROW.match, proc.stdout.splitlines()) if m]
    return proc, out, rows


def check(proc, out, rows, archs):
    assert proc.returncode == 0, proc.stderr[-3000:] or proc.stdout[-3000:]
    assert rows, "no table printed"
    assert len(list(out.glob("*.cubin"))) == len(rows)
    kernels = {r[0] for r in rows}
    assert {"_step_fwd_kernel", "_step_bwd_kernel", "_wgrad_kernel", "_coupling_kernel"} <= kernels
    assert {int(r[2]) for r in rows} == set(archs)
    for kernel, label, arch, warps, regs, spills, smem, hmma, hgmma in rows:
        assert int(spills) == 0, (kernel, label, arch)
        assert 0 < int(regs) <= 255
        if re.search(r",(tf32|bf16)[,\]]", label) and kernel.startswith(("_step", "_wgrad")):
            assert int(hmma) + int(hgmma) > 0, f"{kernel} {label} sm_{arch}: no tensor-core instruction"
        if ",fp32" in label and kernel.startswith("_step"):
            assert int(hmma) + int(hgmma) == 0, "fp32 mode must use exact (ieee) products"


def test_aot_quick_sm90(tmp_path):
    proc, out, rows = run_aot(tmp_path, "--arch", "90", "--quick", "--jobs", "2", timeout=600)
    check(proc, out, rows, [90])


def test_aot_quick_sm80(tmp_path):
    proc, out, rows = run_aot(tmp_path, "--arch", "80", "--quick", "--jobs", "2", timeout=600)
    check(proc, out, rows, [80])


@pytest.mark.slow
def test_aot_every_configuration_sm80_sm90(tmp_path):
    proc, out, rows = run_aot(tmp_path, "--arch", "80", "--arch", "90", "--jobs", str(os.cpu_count() or 1),
                              timeout=7200)
    check(proc, out, rows, [80, 90])
