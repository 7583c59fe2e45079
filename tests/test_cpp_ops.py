"""The C++/CUDA extension behind backends "cpp" and "cuda" (csrc/rg_coupling.cpp,
csrc/rg_coupling_cuda.cu, rgflow_fast/_extension.py): build and load, the torch.library
registrations (opcheck, torch.compile), results independent of the thread count and of the
run, NaN propagation, error messages, and that the CUDA sources compile.

Values and gradients against the reference on every geometry, and half precision, are in
test_rg_coupling.py and test_model_backends.py, which run on every fast backend that loads.
"""
import os
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

import rgflow_fast as rf
from conftest import skip_unless_device
from rgflow_fast import _extension, cpp_ops
from rgflow_fast import functional as rgf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ops():
    reason = cpp_ops.cpp.unavailable_reason()
    assert reason is None, f"the C++ extension does not load: {reason}"
    return torch.ops.rgflow_fast


def samples(dtype=torch.float64, device="cpu", B=2, C=2, L=8, k=4, d=1, requires_grad=False):
    P = (L // (k * d)) ** 2
    x = torch.randn(B, C, L, L, dtype=dtype, device=device)
    s = 2 * torch.randn(B * P, C, k, k, dtype=dtype, device=device)
    t = torch.randn(B * P, C, k, k, dtype=dtype, device=device).transpose(2, 3)
    return [v.requires_grad_(requires_grad) for v in (x, s, t)]


def test_cpp_backend_is_available_and_auto_picks_it_on_cpu(ops):
    assert "cpp" in rf.available_backends()
    x, s, t = samples()
    with rf.use_backend("auto"):
        assert rf.backends.resolve(x) is cpp_ops.cpp


def test_opcheck(seed, ops):
    x, s, t = samples(requires_grad=True)
    g = torch.randn(2, dtype=torch.float64)
    cases = [
        (ops.rg_gather, (x, 4, 1, 2)),
        (ops.rg_scatter, (s, x, 4, 1, 2)),
        (ops.rg_coupling, (x, s, t, 4, 1, 2, 0, False, False)),
        (ops.rg_coupling, (x, s, t, 4, 1, 0, 1, True, True)),
        (ops.rg_coupling_backward, (x.detach(), s.detach(), t.detach(), torch.randn_like(x), g, None, 4, 1, 2, 1, False)),
        (ops.rg_coupling_backward, (x.detach(), s.detach(), t.detach(), torch.randn_like(x), g, torch.randn_like(s), 4, 1, 0, 0, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_traces_without_graph_breaks(seed, ops):
    x, s, t = samples()

    def f(x, s, t):
        y, ldj, v = rgf.rg_coupling_step(x, s, t, 4, 1, 2, 0, False)
        return rgf.rg_gather(y, 4, 1, 0) * v, ldj

    with rf.use_backend("cpp"):
        expected = f(x, s, t)
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, s, t)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_double_backward_says_what_to_do(seed, ops):
    x, s, t = samples(requires_grad=True)
    with rf.use_backend("cpp"):
        y, ldj = rgf.rg_coupling(x, s, t, 4, 1, 2, 0)
    (gx,) = torch.autograd.grad(ldj.sum() + y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"differentiable once.*use_backend\('torch'\)"):
        gx.sum().backward()


def _coupling_results(x, s, t, inverse):
    """Outputs and all gradients of one fused step (with the emitted patches) on "cpp"."""
    leaves = [v.detach().clone().requires_grad_() for v in (x, s, t)]
    with rf.use_backend("cpp"):
        y, ldj, v = rgf.rg_coupling_step(*leaves, 4, 1, 2, 1, inverse)
    g = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (y, ldj, v))
    return [y, ldj, v, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("inverse", [False, True])
def test_results_do_not_depend_on_thread_count_or_run(seed, ops, inverse):
    # big enough that at::parallel_for splits the rows (grain 32768 / L rows)
    x, s, t = samples(dtype=torch.float32, B=16, C=3, L=32)
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = _coupling_results(x, s, t, inverse)
        again = _coupling_results(x, s, t, inverse)
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[n], results[1])), n
    assert all(torch.equal(a, b) for a, b in zip(again, results[1]))


def test_nan_and_saturated_scales_match_reference(seed, ops):
    x, s, t = samples(dtype=torch.float32)
    s[0, 0, 0, 1] = float("nan")
    s[1, 1, 2, 1] = 1e4  # tanh saturates to exactly +-1
    s[2, 0, 1, 2] = -1e4
    with rf.use_backend("cpp"):
        got = rgf.rg_coupling(x, s, t, 4, 1, 0, 0)
    with rf.use_backend("torch"):
        want = rgf.rg_coupling(x, s, t, 4, 1, 0, 0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert bool(got[1].isnan()[0]) and not bool(got[1].isnan()[1])


def test_unsupported_tensors_raise_naming_alternatives(ops):
    with rf.use_backend("cpp"):
        with pytest.raises(RuntimeError, match=r"cannot run on a torch.float32 tensor on meta: .*run on cpu tensors"):
            rgf.rg_gather(torch.zeros(1, 1, 4, 4, device="meta"), 2, 1, 0)


def test_direct_op_calls_check_their_inputs(ops):
    x, s, t = samples()
    with pytest.raises(RuntimeError, match=r"s must have shape \(B\*P, C, k, k\)"):
        ops.rg_coupling(x, s[1:], t, 4, 1, 0, 0, False, False)
    with pytest.raises(RuntimeError, match="parity must be 0 or 1"):
        ops.rg_coupling(x, s, t, 4, 1, 0, 2, False, False)
    with pytest.raises(RuntimeError, match="must be a multiple of kernel_size\\*dilation"):
        ops.rg_gather(x, 4, 4, 0)
    g_ldj = torch.zeros(2, dtype=x.dtype)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \(B, C, L, L\) .* dtype and device"):
        ops.rg_coupling_backward(x, s, t, x.float(), g_ldj, None, 4, 1, 0, 0, False)
    with pytest.raises(RuntimeError, match=r"grad_ldj must have shape \(B,\) = \[2\]"):
        ops.rg_coupling_backward(x, s, t, x, g_ldj[:1], None, 4, 1, 0, 0, False)


def test_missing_compiler_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = _extension._build("cpu")
    assert "no C++ compiler found" in reason and "/nonexistent/c++" in reason and "install" in reason


def test_cuda_backend_explains_why_it_is_off():
    reason = rf.backends._load("cuda")[1]
    if torch.cuda.is_available() and reason is None:
        return
    assert reason, "backend 'cuda' must be available or say why not"
    if not torch.cuda.is_available():
        assert "no CUDA device" in reason or "CPU-only build" in reason


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
    nvcc = Path(home or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.exists() or not (nvcc.parent.parent / "include" / "cuda_runtime.h").is_file():
        pytest.skip(f"no CUDA toolkit (nvcc and include/cuda_runtime.h) under CUDA_HOME={home}")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build (no CUDA headers)")
    return nvcc


@pytest.mark.slow
def test_cuda_sources_compile(tmp_path):
    # compile only (no link, one architecture): catches CUDA errors on a machine without a GPU
    from torch.utils import cpp_extension

    nvcc = _nvcc()
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{ROOT / 'csrc'}"]
    std = "-std=c++20" if torch.torch_version.TorchVersion(torch.__version__) >= (2, 10) else "-std=c++17"
    cmd = [
        str(nvcc), "-c", str(ROOT / "csrc" / "rg_coupling_cuda.cu"), "-o", str(tmp_path / "rg_coupling_cuda.o"),
        std, *includes, f"-I{sysconfig.get_paths()['include']}", *cpp_extension.COMMON_NVCC_FLAGS,
        "-gencode", "arch=compute_80,code=sm_80", "-Xcompiler", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.gpu
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_ops_match_cpp_and_are_deterministic(seed, dtype, inverse):
    skip_unless_device("cuda")
    assert rf.backends._load("cuda")[0] is not None, rf.backends._load("cuda")[1]
    x, s, t = samples(dtype=dtype, B=5, C=3, L=16)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=g, dtype=dtype) for shape in (x.shape, (5,), s.shape)]

    def run(backend, device):
        leaves = [v.detach().to(device).requires_grad_() for v in (x, s, t)]
        with rf.use_backend(backend):
            out = rgf.rg_coupling_step(*leaves, 4, 1, 2, 0, inverse)
        loss = sum((o * w.to(device)).sum() for o, w in zip(out, grads))
        return [r.detach().cpu() for r in (*out, *torch.autograd.grad(loss, leaves))]

    first, second = run("cuda", "cuda"), run("cuda", "cuda")
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(first, run("cpp", "cpu")):
        torch.testing.assert_close(a, b, **tol)
