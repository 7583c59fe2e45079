"""The rg_coupling family (gather, scatter, coupling, inverse, coupling step) on every fast
backend against the reference (backend "torch"): values and all gradients, float32 and
float64, random geometries and non-contiguous inputs; half precision where a backend runs
it; gradcheck; the Triton custom ops' opcheck; dispatch errors.

On a machine without CUDA the Triton kernels run in Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which is slow: sizes stay tiny.
"""
import pytest
import torch

import rgflow_fast as rf
from conftest import DEVICES, FAST_BACKENDS, skip_unless_device
from rgflow_fast import backends
from rgflow_fast import functional as rgf

# (L, k, dilation, offset): kernels 2 and 4, every level of 1 to 4-level images, both offsets.
GEOMETRIES = [
    (4, 2, 1, 0), (4, 2, 2, 2),
    (8, 2, 1, 1), (8, 2, 2, 0), (8, 2, 4, 4),
    (16, 2, 1, 0), (16, 2, 8, 8),
    (4, 4, 1, 2),
    (8, 4, 2, 4),
    (16, 4, 1, 2), (16, 4, 2, 0), (16, 4, 4, 8),
    (32, 4, 8, 16),
]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}

if not FAST_BACKENDS:
    pytest.skip("no fast backend loads here (only the reference)", allow_module_level=True)


def strided(shape, dtype, device, kind):
    """A random tensor of ``shape`` laid out non-contiguously (``kind`` 0: transposed last two
    dims, 1: every other element of a wider tensor, 2: contiguous)."""
    if kind == 0:
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device).transpose(-1, -2)
    if kind == 1:
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)[..., ::2]
    return torch.randn(shape, dtype=dtype, device=device)


def case(L, k, d, device, dtype):
    """Random batch and channels (1 to 3) and random layouts for image, s and t."""
    B, C = (int(v) for v in torch.randint(1, 4, (2,)))  # torch's generator: replayable from the seed
    P = (L // (k * d)) ** 2
    x = strided((B, C, L, L), dtype, device, int(torch.randint(3, ())))
    s = strided((B * P, C, k, k), dtype, device, int(torch.randint(3, ())))
    t = strided((B * P, C, k, k), dtype, device, int(torch.randint(3, ())))
    return x, s, t


def run(backend, fn, *tensors, grads):
    """``fn(*tensors)`` under ``backend``; returns (outputs, gradients of Σ out·grad wrt tensors)."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    with rf.use_backend(backend):
        out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    loss = sum((o * g).sum() for o, g in zip(out, grads))
    return [o.detach() for o in out], torch.autograd.grad(loss, leaves)


def assert_matches(backend, fn, tensors, dtype):
    """``fn`` on ``backend`` equals ``fn`` on the reference in its outputs and every input
    gradient, for random output gradients."""
    with rf.use_backend("torch"):
        ref = fn(*tensors)
    ref = ref if isinstance(ref, tuple) else (ref,)
    grads = [torch.randn_like(o) for o in ref]
    expected, expected_grads = run("torch", fn, *tensors, grads=grads)
    got, got_grads = run(backend, fn, *tensors, grads=grads)
    for name, a, b in zip(("output",) * len(got) + ("gradient",) * len(got_grads), got + list(got_grads), expected + list(expected_grads)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.fixture(params=DEVICES)
def device(request):
    skip_unless_device(request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,k,d,off", GEOMETRIES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gather_and_scatter_match_reference(seed, backend, device, dtype, L, k, d, off):
    x, s, _ = case(L, k, d, device, dtype)
    with rf.use_backend(backend):
        assert torch.equal(rgf.rg_gather(x, k, d, off), rgf.rg_gather(x.contiguous(), k, d, off))
    assert_matches(backend, lambda x: rgf.rg_gather(x, k, d, off), [x], dtype)
    assert_matches(backend, lambda p, x: rgf.rg_scatter(p, x, k, d, off), [s, x], dtype)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,k,d,off", GEOMETRIES)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_coupling_ops_match_reference(seed, backend, device, dtype, L, k, d, off, parity, inverse):
    x, s, t = case(L, k, d, device, dtype)
    couple = rgf.rg_coupling_inverse if inverse else rgf.rg_coupling
    assert_matches(backend, lambda x, s, t: couple(x, s, t, k, d, off, parity), [x, s, t], dtype)
    assert_matches(
        backend, lambda x, s, t: rgf.rg_coupling_step(x, s, t, k, d, off, parity, inverse), [x, s, t], dtype
    )


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("inverse", [False, True])
def test_reference_coupling_step_emits_the_transformed_half(seed, parity, inverse):
    # the reference of the step op against its definition: v = gather(y) on this step's
    # transformed half (a+b odd for parity 0), zero elsewhere
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    s, t = torch.randn(2, 8, 2, 4, 4, dtype=torch.float64)
    with rf.use_backend("torch"):
        y, ldj, v = rgf.rg_coupling_step(x, s, t, 4, 1, 2, parity, inverse)
        expected = (rgf.rg_coupling_inverse if inverse else rgf.rg_coupling)(x, s, t, 4, 1, 2, parity)
        u = rgf.rg_gather(y, 4, 1, 2)
    assert torch.equal(y, expected[0]) and torch.equal(ldj, expected[1])
    a = torch.arange(4)
    transformed = ((a[:, None] + a[None, :]) % 2) == 1 - parity
    assert torch.equal(v, torch.where(transformed, u, torch.zeros_like(u)))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_gradcheck(seed, backend, device):
    opts = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(1, 1, 4, 4, **opts)
    s = torch.randn(4, 1, 2, 2, **opts)
    t = torch.randn(4, 1, 2, 2, **opts)
    with rf.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, s, t: rgf.rg_coupling(x, s, t, 2, 1, 1, 0), (x, s, t))
        assert torch.autograd.gradcheck(lambda x, s, t: rgf.rg_coupling_inverse(x, s, t, 2, 1, 0, 1), (x, s, t))
        assert torch.autograd.gradcheck(lambda x, s, t: rgf.rg_coupling_step(x, s, t, 2, 1, 1, 1, True), (x, s, t))
        assert torch.autograd.gradcheck(lambda p, x: rgf.rg_scatter(p, x, 2, 2, 2), (s[:1], x))
        assert torch.autograd.gradcheck(lambda x: rgf.rg_gather(x, 2, 1, 1), (x,))


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="the Triton backend does not load here")
class TestTritonOps:
    """The torch.library registrations of backend "triton" (namespace rgflow_fast_triton)."""

    def samples(self, device):
        x = torch.randn(2, 2, 8, 8, dtype=torch.float64, device=device, requires_grad=True)
        s = torch.randn(8, 2, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
        t = torch.randn(8, 2, 4, 4, dtype=torch.float64, device=device).transpose(2, 3).requires_grad_()
        return x, s, t

    def test_opcheck(self, seed, device):
        ops = torch.ops.rgflow_fast_triton
        x, s, t = self.samples(device)
        g = torch.randn(2, dtype=torch.float64, device=device)
        zeros = x.new_zeros(()).expand(x.shape)  # how the gather's backward calls scatter
        cases = [
            (ops.rg_gather, (x, 4, 2, 4)),
            (ops.rg_scatter, (s, x, 4, 1, 2)),
            (ops.rg_scatter, (s, zeros, 4, 1, 2)),
            (ops.rg_coupling, (x, s, t, 4, 1, 2, 0, False, True)),
            (ops.rg_coupling, (x, s, t, 4, 1, 0, 1, True, False)),
            (ops.rg_coupling_backward, (x.detach(), s.detach(), t.detach(), torch.randn_like(x), g, None, 4, 1, 2, 1, False)),
        ]
        for op, args in cases:
            torch.library.opcheck(op, args)

    def test_double_backward_says_what_to_do(self, seed, device):
        x, s, t = self.samples(device)
        with rf.use_backend("triton"):
            y, ldj = rgf.rg_coupling(x, s, t, 4, 1, 2, 0)
        (gx,) = torch.autograd.grad(ldj.sum() + y.pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=r"differentiable once.*use_backend\('torch'\)"):
            gx.sum().backward()

    @pytest.mark.parametrize("interpreted,dtype,reason", [
        (True, torch.float16, "run float32, float64 on cpu, not torch.float16"),
        (False, torch.float32, "TRITON_INTERPRET=1"),
    ])
    def test_unsupported_tensors_raise_naming_alternatives(self, monkeypatch, interpreted, dtype, reason):
        from rgflow_fast import triton_ops

        monkeypatch.setattr(triton_ops._kernels, "INTERPRETED", interpreted)
        with rf.use_backend("triton"):
            with pytest.raises(RuntimeError, match=rf"cannot run on a {dtype} tensor on cpu: .*{reason}.*Backends that can: \[.*'torch'"):
                rgf.rg_gather(torch.zeros(1, 1, 4, 4, dtype=dtype), 2, 1, 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_half_precision(seed, backend, device, dtype, tol):
    # half inputs, computed in float32 and rounded once per output: compared with the
    # reference on the same (exactly representable) values in float64
    x, s, t = case(16, 4, 1, device, torch.float32)
    x, s, t = (v.to(dtype) for v in (x, s, t))
    reason = backends._load(backend)[0].unsupported_reason(x)
    if reason is not None:
        pytest.skip(f"backend {backend!r}: {reason}")
    with rf.use_backend(backend):
        y, ldj, v = rgf.rg_coupling_step(x, s, t, 4, 1, 2, 1, False)
    with rf.use_backend("torch"):
        y64, ldj64, v64 = rgf.rg_coupling_step(x.double(), s.double(), t.double(), 4, 1, 2, 1, False)
    for got, want in ((y, y64), (v, v64)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(ldj.double(), ldj64, rtol=tol, atol=tol * ldj64.abs().max().item())
