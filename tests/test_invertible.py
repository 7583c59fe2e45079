"""memory_efficient=True (invertible backprop) against the ordinary backward."""
import pytest
import torch

import rgflow_fast as rf
from conftest import FAST_BACKENDS, randomize_


def saved_activation_bytes(model, x):
    """Bytes autograd keeps for backward after the forward pass of one log_prob, parameters
    excluded (invertible backprop then recomputes one block at a time)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.log_prob(x).sum()
    loss.backward()
    return total


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
def test_gradients_match_ordinary_backward(seed, backend, dtype, tol):
    model = randomize_(rf.RGFlow(16, 2, kernel_size=4, n_layers=[2, 1, 1], n_res_blocks=1, n_mlp=1, hidden=12).to(dtype))
    x = torch.randn(3, 2, 16, 16, dtype=dtype, requires_grad=True)
    results = []
    with rf.use_backend(backend):
        for memory_efficient in (False, True):
            model.memory_efficient = memory_efficient
            model.zero_grad()
            x.grad = None
            z, ldj = model(x)
            loss = (model.prior.log_prob(z) + ldj).sum() + (z**2).mean()
            loss.backward()
            results.append((loss.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters()]))
    (l0, gx0, gp0), (l1, gx1, gp1) = results
    torch.testing.assert_close(l1, l0, rtol=tol, atol=0)
    scale = max(g.abs().max().item() for g in gp0)
    torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol * gx0.abs().max().item())
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


def test_saved_activations_do_not_grow_with_depth(seed):
    x = torch.randn(2, 1, 16, 16)
    saved = {}
    for n_layers in (1, 4):
        for memory_efficient in (False, True):
            model = rf.RGFlow(16, 1, n_layers=n_layers, n_res_blocks=1, n_mlp=1, hidden=8, memory_efficient=memory_efficient)
            saved[n_layers, memory_efficient] = saved_activation_bytes(model, x)
    # only z is kept by the flow (the prior's log_prob keeps z and its scale map)
    assert saved[4, True] == saved[1, True] <= 3 * x.numel() * x.element_size()
    assert saved[4, False] > 3 * saved[1, False] > 0


def test_no_grad_forward_is_unchanged(seed):
    model = randomize_(rf.RGFlow(8, 1, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=4, memory_efficient=True).double())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        z, ldj = model(x)
    model.memory_efficient = False
    z0, ldj0 = model(x)
    assert torch.equal(z, z0) and torch.equal(ldj, ldj0)
