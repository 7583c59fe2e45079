"""The reference ops (backend "torch") against their defining formulas, and the public
ops' input validation (shared by every backend)."""
import pytest
import torch

import rgflow_fast as rf
from rgflow_fast import functional as rgf

GEOMETRIES = [  # (L, k, dilation, offset)
    (4, 2, 1, 0), (4, 2, 2, 2), (8, 4, 1, 2), (8, 4, 2, 4), (8, 2, 4, 0), (16, 4, 4, 8), (6, 2, 3, 3),
]


def loop_gather(x, k, d, off):
    B, C, L, _ = x.shape
    m = L // (k * d)
    out = torch.empty(B * m * m, C, k, k, dtype=x.dtype)
    for b in range(B):
        for pi in range(m):
            for pj in range(m):
                for a in range(k):
                    for bb in range(k):
                        out[b * m * m + pi * m + pj, :, a, bb] = x[
                            b, :, (pi * k * d + a * d + off) % L, (pj * k * d + bb * d + off) % L
                        ]
    return out


@pytest.fixture(autouse=True)
def _reference():
    with rf.use_backend("torch"):
        yield


@pytest.mark.parametrize("L,k,d,off", GEOMETRIES)
def test_gather_matches_formula_and_scatter_inverts_it(seed, L, k, d, off):
    x = torch.randn(2, 3, L, L, dtype=torch.float64)
    u = rgf.rg_gather(x, k, d, off)
    assert torch.equal(u, loop_gather(x, k, d, off))
    assert torch.equal(rgf.rg_scatter(u, x, k, d, off), x)
    # scatter writes exactly the patch pixels and keeps the rest
    y = rgf.rg_scatter(u + 1, x, k, d, off)
    touched = rgf.rg_scatter(torch.ones_like(u), torch.zeros_like(x), k, d, off).bool()
    assert torch.equal(y[touched], x[touched] + 1) and torch.equal(y[~touched], x[~touched])


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("L,k,d,off", GEOMETRIES)
def test_coupling_matches_formula(seed, L, k, d, off, parity):
    x = torch.randn(2, 2, L, L, dtype=torch.float64)
    u = rgf.rg_gather(x, k, d, off)
    s, t = torch.randn_like(u), torch.randn_like(u)
    y, ldj = rgf.rg_coupling(x, s, t, k, d, off, parity)
    a = torch.arange(k)
    transformed = ((a[:, None] + a[None, :]) % 2 == (1 - parity)).expand_as(u)
    expected = torch.where(transformed, u * torch.exp(torch.tanh(s)) + t, u)
    assert torch.allclose(rgf.rg_gather(y, k, d, off), expected, rtol=1e-14, atol=1e-14)
    expected_ldj = (torch.tanh(s) * transformed).reshape(2, -1).sum(1)
    assert torch.allclose(ldj, expected_ldj, rtol=1e-13)
    x_back, inv_ldj = rgf.rg_coupling_inverse(y, s, t, k, d, off, parity)
    assert torch.allclose(x_back, x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(inv_ldj, -ldj, rtol=1e-13)


@pytest.mark.parametrize("L,k,d,off,parity", [(4, 2, 1, 0, 0), (4, 2, 2, 2, 1), (8, 4, 1, 2, 1), (8, 4, 2, 0, 0)])
@pytest.mark.parametrize("C", [1, 2])
def test_coupling_logdet_is_log_abs_det_jacobian(seed, L, k, d, off, parity, C):
    x = torch.randn(1, C, L, L, dtype=torch.float64)
    s = torch.randn_like(rgf.rg_gather(x, k, d, off))
    t = torch.randn_like(s)
    jac = torch.autograd.functional.jacobian(lambda v: rgf.rg_coupling(v, s, t, k, d, off, parity)[0], x)
    jac = jac.reshape(x.numel(), x.numel())
    ldj = rgf.rg_coupling(x, s, t, k, d, off, parity)[1]
    assert torch.allclose(ldj, torch.linalg.slogdet(jac)[1], rtol=1e-10)


def test_ops_accept_non_contiguous_input(seed):
    base = torch.randn(3, 8, 8, 2, dtype=torch.float64)
    x = base[..., 0].unsqueeze(0).transpose(2, 3)  # (1, 3, 8, 8), not contiguous
    assert not x.is_contiguous()
    u = rgf.rg_gather(x, 4, 1, 2)
    assert torch.equal(u, loop_gather(x.contiguous(), 4, 1, 2))
    s = torch.randn_like(u).transpose(2, 3)
    y, _ = rgf.rg_coupling(x, s, s, 4, 1, 2, 0)
    y2, _ = rgf.rg_coupling(x.contiguous(), s.contiguous(), s.contiguous(), 4, 1, 2, 0)
    assert torch.equal(y, y2)


def test_ops_gradcheck(seed):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s, t: rgf.rg_coupling(x, s, t, 2, 1, 1, 0), (x, s, t))
    assert torch.autograd.gradcheck(lambda x, s, t: rgf.rg_coupling_inverse(x, s, t, 2, 1, 1, 1), (x, s, t))
    assert torch.autograd.gradcheck(lambda p, x: rgf.rg_scatter(p, x, 2, 1, 1), (s, x))
    assert torch.autograd.gradcheck(lambda x: rgf.rg_gather(x, 2, 1, 1), (x,))


def test_op_errors():
    x = torch.randn(1, 2, 8, 8)
    u = rgf.rg_gather(x, 4, 1, 0)
    with pytest.raises(ValueError, match=r"\(B, C, L, L\)"):
        rgf.rg_gather(x[0], 4, 1, 0)
    with pytest.raises(ValueError, match="square"):
        rgf.rg_gather(x[..., :4], 4, 1, 0)
    with pytest.raises(ValueError, match="multiple of kernel_size"):
        rgf.rg_gather(x, 4, 4, 0)
    with pytest.raises(ValueError, match="kernel_size must be even"):
        rgf.rg_gather(x, 3, 1, 0)
    with pytest.raises(ValueError, match="parity"):
        rgf.rg_coupling(x, u, u, 4, 1, 0, 2)
    with pytest.raises(ValueError, match=r"\(B\*P, C, k, k\)"):
        rgf.rg_coupling(x, u[:1], u, 4, 1, 0, 0)
    with pytest.raises(ValueError, match="dtype and device"):
        rgf.rg_coupling(x, u.double(), u, 4, 1, 0, 0)
    with pytest.raises(TypeError, match="floating-point"):
        rgf.rg_gather(x.long(), 4, 1, 0)


def test_backend_selection_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        rf.use_backend("tpu")  # when called, not only when entered
    monkeypatch.setenv("RGFLOW_FAST_BACKEND", "nonsense")
    with rf.use_backend("torch"):  # an explicit choice wins over the environment
        assert rf.current_backend() == "torch"
    monkeypatch.setenv("RGFLOW_FAST_BACKEND", "torch")
    assert "torch" in rf.available_backends()


def test_environment_sets_default_backend(monkeypatch):
    from rgflow_fast import backends

    monkeypatch.setenv("RGFLOW_FAST_BACKEND", "nonsense")
    token = backends._requested.set(None)
    try:
        with pytest.raises(ValueError, match="RGFLOW_FAST_BACKEND"):
            backends.current_backend()
        monkeypatch.setenv("RGFLOW_FAST_BACKEND", "torch")
        assert backends.current_backend() == "torch"
        assert backends.resolve(torch.zeros(1)).NAME == "torch"
    finally:
        backends._requested.reset(token)


def test_unusable_backend_errors_name_alternatives(monkeypatch):
    import types

    from rgflow_fast import backends, reference

    picky = types.SimpleNamespace(NAME="cuda", unsupported_reason=lambda x: "needs a CUDA tensor")
    loads = {"torch": (reference, None), "cuda": (picky, None), "triton": (None, "triton is not installed")}
    monkeypatch.setattr(backends, "_load", lambda name: loads.get(name, (None, "not built")))
    with pytest.raises(RuntimeError, match="not available: triton is not installed"):
        with rf.use_backend("triton"):
            pass
    with rf.use_backend("cuda"):
        with pytest.raises(RuntimeError, match=r"cannot run on a torch.float32 tensor on cpu: needs a CUDA tensor.*\['torch'\]"):
            rgf.rg_gather(torch.zeros(1, 1, 4, 4), 2, 1, 0)
    with rf.use_backend("auto"):  # auto skips what cannot run
        assert rgf.rg_gather(torch.zeros(1, 1, 4, 4), 2, 1, 0).shape == (4, 1, 2, 2)
