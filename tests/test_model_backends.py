"""The whole RG-Flow on every fast backend against the reference (backend "torch"): forward,
inverse, log_prob and the gradients of all parameters; the original-format fixture; a
torch.compile(fullgraph=True) trace.

The fast backends run the same arithmetic as the reference in fused kernels, in another
order: they match it to rounding.
"""
import pytest
import torch

import rgflow_fast as rf
from conftest import DEVICES, FAST_BACKENDS, randomize_, skip_unless_device

if not FAST_BACKENDS:
    pytest.skip("no fast backend loads here (only the reference)", allow_module_level=True)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}
# (image size, kernel, channels, batch, layers per level): 4 levels with k=2, 3 with k=4
CONFIGS = [(16, 2, 1, 2, 1), (16, 4, 3, 1, (2, 1, 1))]


@pytest.fixture(params=DEVICES)
def device(request):
    skip_unless_device(request.param)
    return request.param


def small_model(L, k, C, layers, dtype, device):
    model = rf.RGFlow(L, C, kernel_size=k, n_layers=layers, n_res_blocks=1, n_mlp=1, hidden=8)
    return randomize_(model).to(dtype=dtype, device=device)


def close(a, b, dtype, what):
    scale = max(b.abs().max().item(), 1.0)
    tol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m: f"{what}: {m}")


def forward_and_grads(model, backend, x, w):
    """(z, ldj, log_prob, x recovered from z, inverse ldj, gradients of every parameter)."""
    model.zero_grad()
    with rf.use_backend(backend):
        z, ldj = model(x)
        log_prob = model.log_prob(x)
        (log_prob.sum() + (z * w).sum()).backward()
        with torch.no_grad():
            x_back, inv_ldj = model.inverse(z)
    grads = [p.grad.clone() for p in model.parameters()]
    return z.detach(), ldj.detach(), log_prob.detach(), x_back, inv_ldj, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("L,k,C,B,layers", CONFIGS)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_model_matches_reference(seed, backend, device, dtype, L, k, C, B, layers):
    model = small_model(L, k, C, layers, dtype, device)
    x = torch.randn(B, C, L, L, dtype=dtype, device=device)
    w = torch.randn_like(x)
    expected = forward_and_grads(model, "torch", x, w)
    assert (expected[0] - x).abs().max() > 0.1, "randomised model should not be the identity"
    got = forward_and_grads(model, backend, x, w)
    for what, a, b in zip(("z", "ldj", "log_prob", "inverse x", "inverse ldj"), got[:5], expected[:5]):
        close(a, b, dtype, what)
    close(got[3], x, dtype, "inverse(forward(x))")
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, got[5], expected[5]):
        close(a, b, dtype, f"gradient of {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fixture_conformance(fixture_data, backend, device):
    model = rf.from_original(fixture_data["state_dict"], fixture_data["config"]).to(device)
    x = fixture_data["x"].to(device)
    with rf.use_backend(backend):
        z, ldj = model(x)
        log_prob = model.log_prob(x)
    for ours, theirs in ((z, fixture_data["z"]), (ldj, fixture_data["ldj"]), (log_prob, fixture_data["log_prob"])):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-10, atol=1e-10 * theirs.abs().max().item())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_compile_traces_without_graph_breaks(seed, backend, device):
    # fullgraph=True fails on any graph break. On CUDA the model compiles with Inductor; on
    # the CPU the Triton kernels run in the interpreter, so the trace (Dynamo + AOTAutograd,
    # forward and backward through the ops' fake kernels) is run with the "aot_eager"
    # backend, which executes the traced graphs with eager kernels instead of generating code.
    compiler = "inductor" if device == "cuda" else "aot_eager"
    model = small_model(8, 4, 1, 1, torch.float32, device)
    model.check_inputs = False
    x = torch.randn(2, 1, 8, 8, device=device)

    def loss(x):
        z, ldj = model(x)
        return (ldj - z.pow(2).sum(dim=(1, 2, 3))).sum()

    with rf.use_backend(backend):
        compiled = torch.compile(loss, fullgraph=True, backend=compiler)
        value = compiled(x)
        value.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with rf.use_backend("torch"):
        expected = loss(x)
        expected.backward()
    close(value.detach(), expected.detach(), torch.float32, "loss")
    for (name, p), g in zip(model.named_parameters(), grads):
        close(g, p.grad, torch.float32, f"gradient of {name}")
