"""The fused Triton ``rg_coupling_layer`` (rgflow_fast.triton_layer) against the reference
(rgflow_fast.coupling_layer.reference_layer): values and every gradient, on the CPU in
Triton's interpreter (float32 and float64) and, when CUDA is present, on the GPU in each
precision mode. bf16's maths is checked on the CPU by fp32 emulation (operands rounded to bf16
where the kernels round them): the interpreter computes products exactly and truncates bf16.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from rgflow_fast.coupling_layer import reference_layer
from rgflow_fast.reference import checkerboard, coupling_inverse_on_patches, coupling_on_patches

triton = pytest.importorskip("triton")
tlay = pytest.importorskip("rgflow_fast.triton_layer")
if tlay._k is None:
    pytest.skip(f"Triton kernels unavailable: {tlay._IMPORT_ERROR}", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def make_params(C, k, hidden, n_res, n_mlp, dtype, device="cpu", scale=1.0):
    """Both nets' flat parameter list (module docstring of rgflow_fast.coupling_layer), perturbed
    away from the identity initialisation so that every path carries signal."""
    D = C * k * k
    widths = [D] + [hidden] * n_mlp + [D]
    params = []
    for _ in range(2):
        for _ in range(n_res):
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                params += [
                    1 + 0.3 * torch.randn(w_in),
                    torch.randn(w_out, w_in) * math.sqrt(2.81 * 3 / w_in) / math.sqrt(3),
                    1 + 0.2 * torch.randn(w_out, 1),
                    0.1 * torch.randn(w_out),
                ]
        params.append(scale * 0.5 * torch.randn(D))
    return [p.to(dtype=dtype, device=device).requires_grad_() for p in params]


def layer_inputs(B, P, C, k, dtype, device, contiguous=True):
    N = B * P
    if contiguous:
        u = torch.randn(N, C, k, k, dtype=dtype, device=device)
    else:  # a transposed view: (N, C, k, k) with swapped spatial strides
        u = torch.randn(N, C, k, k, dtype=dtype, device=device).transpose(2, 3)
    ldj = torch.randn(B, dtype=dtype, device=device)
    return u.requires_grad_(), ldj.requires_grad_()


def value_and_grads(layer, u, ldj, params, n_mlp, inverse, recompute, g_y, g_ldj, **kw):
    y, out_ldj = layer(u, ldj, params, n_mlp, inverse, recompute, **kw)
    loss = (y * g_y).sum() + (out_ldj * g_ldj).sum()
    return y, out_ldj, torch.autograd.grad(loss, [u, ldj, *params])


def assert_matches(got, want, rtol, atol_rel, what):
    scale = want.abs().max().item() or 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol_rel * scale, msg=lambda m: f"{what}: {m}")


# (C, k, n_res, n_mlp, dtype, inverse, recompute, contiguous): every feature at least once;
# hidden (often not a multiple of 8), B and P (N odd where possible) are drawn per run.
CASES = [
    (1, 2, 1, 1, torch.float64, False, False, True),
    (3, 4, 2, 2, torch.float64, True, True, False),
    (2, 4, 1, 3, torch.float32, False, True, True),
    (1, 4, 3, 1, torch.float64, True, False, True),
    (3, 2, 0, 2, torch.float64, False, False, False),
    (2, 2, 2, 1, torch.float32, True, False, False),
    (3, 4, 1, 2, torch.float32, False, False, True),
    (1, 2, 0, 1, torch.float32, True, True, True),
]


@pytest.mark.parametrize("C,k,n_res,n_mlp,dtype,inverse,recompute,contiguous", CASES)
def test_layer_matches_reference(seed, C, k, n_res, n_mlp, dtype, inverse, recompute, contiguous):
    rng = random.Random(seed)
    hidden = rng.choice([5, 11, 17, 23, 36])
    B, P = rng.choice([1, 3]), rng.choice([3, 5, 7])
    params = make_params(C, k, hidden, n_res, n_mlp, dtype, DEVICE)
    u, ldj = layer_inputs(B, P, C, k, dtype, DEVICE, contiguous)
    if CUDA and dtype == torch.float64:
        pytest.skip("the fused layer runs float32 on the GPU (float64 in the interpreter)")
    assert tlay.unsupported_reason(u, params, n_mlp) is None
    g_y, g_ldj = torch.randn_like(u), torch.randn_like(ldj)
    got = value_and_grads(tlay.rg_coupling_layer, u, ldj, params, n_mlp, inverse, recompute, g_y, g_ldj)
    want = value_and_grads(reference_layer, u, ldj, params, n_mlp, inverse, recompute, g_y, g_ldj)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_matches(got[0], want[0], tol, tol, "u'")
    assert_matches(got[1], want[1], tol, tol, "ldj'")
    names = ["u", "ldj"] + [f"param {i}" for i in range(len(params))]
    for name, g, w in zip(names, got[2], want[2]):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_matches(g, w, tol, tol, f"grad of {name}")
    if n_res:  # the check has teeth: the layer is not the identity, every parameter learns
        # (without residual blocks a net is σ ⊙ v, zero on the transformed half: the identity)
        assert (got[0] - u).abs().max() > 1e-3
        assert all(g.abs().max() > 0 for g in got[2][2:])


def test_inverse_undoes_forward(seed):
    params = make_params(3, 4, 19, 2, 2, torch.float64, DEVICE)
    u, ldj = layer_inputs(2, 5, 3, 4, torch.float64, DEVICE)
    with torch.no_grad():
        y, ldj_y = tlay.rg_coupling_layer(u, ldj, params, 2, False)
        back, ldj_back = tlay.rg_coupling_layer(y, ldj_y, params, 2, True)
    torch.testing.assert_close(back, u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ldj_back, ldj, rtol=1e-12, atol=1e-12)


def test_backward_is_deterministic(seed):
    params = make_params(2, 4, 21, 1, 2, torch.float32, DEVICE)
    u, ldj = layer_inputs(3, 7, 2, 4, torch.float32, DEVICE)
    g_y, g_ldj = torch.randn_like(u), torch.randn_like(ldj)
    first = value_and_grads(tlay.rg_coupling_layer, u, ldj, params, 2, False, True, g_y, g_ldj)
    second = value_and_grads(tlay.rg_coupling_layer, u, ldj, params, 2, False, True, g_y, g_ldj)
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_unsupported_shapes_say_why_and_the_backend_falls_back(seed):
    params = make_params(5, 4, 8, 1, 1, torch.float32)  # D = 80 > MAX_D
    u, ldj = layer_inputs(1, 3, 5, 4, torch.float32, "cpu")
    reason = tlay.unsupported_reason(u, params, 1)
    assert reason is not None and "D = C·k² = 80" in reason
    with pytest.raises(ValueError, match="cannot run this call: .*D = C·k² = 80"):
        tlay.rg_coupling_layer(u, ldj, params, 1)
    got = tlay.backend_rg_coupling_layer(u, ldj, params, 1, False, False)
    want = reference_layer(u, ldj, params, 1, False, False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    small = make_params(1, 2, 8, 1, 1, torch.float32)
    u, _ = layer_inputs(1, 3, 1, 2, torch.float32, "cpu")
    assert "precision must be one of" in tlay.unsupported_reason(u, small, 1, "fp16")
    assert "float32 and float64 only" in tlay.unsupported_reason(u.half(), small, 1)
    if tlay._k.INTERPRETED:
        assert "needs a GPU" in tlay.unsupported_reason(u, small, 1, "bf16")


def test_fake_kernel_matches_for_torch_compile(seed):
    # the fake (meta) kernels give the shapes the real ones produce
    params = make_params(1, 2, 9, 1, 2, torch.float32, DEVICE)
    u, ldj = layer_inputs(1, 3, 1, 2, torch.float32, DEVICE)
    n_res = 1
    cfg = tlay._k.tile_config(4, 9, u.device, "fp32")
    packed = [p.detach() for p in tlay.pack_params(params, n_res, 2, 4, cfg)]
    args = (u.detach(), *packed, 2, n_res, 2, 9, False, True, "fp32")
    real = tlay._layer(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = tlay._layer._opoverload(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype


# --- bf16: the maths in fp32 emulation (CPU), the real thing on the GPU --------------------


def _bf16(x):
    return x.to(torch.bfloat16).to(x.dtype)


def _bf16_saved(t):
    return t.to(torch.bfloat16) if t.dtype == torch.float32 else t


def _fp32_unpacked(t):
    return t.float() if t.dtype == torch.bfloat16 else t


def emulated_bf16_layer(u, ldj, params, n_mlp, inverse=False, recompute=False):
    """The reference layer's maths with every linear's operands rounded to bf16 as the kernels
    round them (the activation after Swish, and W = g·V/‖V‖), products and all else in fp32."""
    half, per_block = len(params) // 2, 4 * (n_mlp + 1)
    n_res = (half - 1) // per_block

    def net(v, ps):
        for r in range(n_res):
            h = v
            for i in range(n_mlp + 1):
                beta, V, g, b = ps[r * per_block + 4 * i: r * per_block + 4 * i + 4]
                h = h * torch.sigmoid(beta * h)
                h = F.linear(_bf16(h), _bf16(V * (g / V.norm(dim=1, keepdim=True))), b)
            v = (v + h) / math.sqrt(2)
        return ps[-1] * v

    k = u.shape[-1]
    couple = coupling_inverse_on_patches if inverse else coupling_on_patches
    for parity in ((1, 0) if inverse else (0, 1)):
        v = ((1 - checkerboard(k, parity, u)) * u).reshape(u.shape[0], -1)
        s = net(v, params[:half]).view_as(u)
        t = net(v, params[half:]).view_as(u)
        u, rows = couple(u, s, t, parity)
        ldj = ldj + rows.reshape(ldj.shape[0], -1).sum(dim=1)
    return u, ldj


# Tolerances against the float64 reference, documented in rgflow_fast.triton_layer: the max-abs
# error relative to the max-abs of u', of the layer's log-det contribution ldj' - ldj, and of
# each gradient. bf16's are two to five times the worst seen in fp32 emulation at the paper
# config (u' 1e-3, ldj 7e-3, gradients 2.1e-2 with the saved activations rounded too); TF32
# (8× bf16's precision, activations saved in fp32) gets a quarter.
TOL = {
    "fp32": {"u": 1e-5, "ldj": 1e-4, "grads": 1e-4},
    "tf32": {"u": 1.25e-3, "ldj": 7.5e-3, "grads": 1.25e-2},
    "bf16": {"u": 5e-3, "ldj": 3e-2, "grads": 5e-2},
}


def relative_errors(got, exact, ldj):
    """``{"u", "ldj", "grads"}`` errors of ``got = (u', ldj', grads)`` against ``exact``."""
    def rel(a, b, scale=None):
        return ((a.double() - b.double()).abs().max() / (b if scale is None else scale).double().abs().max()).item()

    return {"u": rel(got[0], exact[0]),
            "ldj": rel(got[1], exact[1], exact[1] - ldj.detach()),
            "grads": max(rel(a, b) for a, b in zip(got[2], exact[2]))}


@pytest.mark.parametrize("inverse", [False, True])
def test_bf16_maths_in_fp32_emulation(seed, inverse):
    C, k, hidden, n_res, n_mlp = 3, 4, 512, 4, 2  # the paper config
    params = make_params(C, k, hidden, n_res, n_mlp, torch.float64)
    u, ldj = layer_inputs(4, 64, C, k, torch.float64, "cpu")
    g_y, g_ldj = torch.randn_like(u), torch.randn_like(ldj)
    exact = value_and_grads(reference_layer, u, ldj, params, n_mlp, inverse, False, g_y, g_ldj)
    p32 = [p.detach().float().requires_grad_() for p in params]
    u32, ldj32 = u.detach().float().requires_grad_(), ldj.detach().float().requires_grad_()
    # the kernels also save the activations (and the output gradients) in bf16: round every
    # tensor autograd saves (a superset, so an upper bound)
    with torch.autograd.graph.saved_tensors_hooks(_bf16_saved, _fp32_unpacked):
        emulated = value_and_grads(emulated_bf16_layer, u32, ldj32, p32, n_mlp, inverse, False,
                                   g_y.float(), g_ldj.float())
    errors = relative_errors(emulated, exact, ldj)
    print(f"bf16 emulation, relative errors: {errors}")
    assert all(errors[key] < TOL["bf16"][key] for key in errors), errors
    assert errors["u"] > 1e-5  # the emulation does round: fp32 alone stays near 1e-7


def _cuda_case(precision, inverse, recompute, hidden=512, n_res=4):
    C, k, n_mlp = 3, 4, 2
    params = make_params(C, k, hidden, n_res, n_mlp, torch.float64, "cuda")
    u, ldj = layer_inputs(4, 64, C, k, torch.float64, "cuda")
    g_y, g_ldj = torch.randn_like(u), torch.randn_like(ldj)
    exact = value_and_grads(reference_layer, u, ldj, params, n_mlp, inverse, False, g_y, g_ldj)
    p32 = [p.detach().float().requires_grad_() for p in params]
    u32, ldj32 = u.detach().float().requires_grad_(), ldj.detach().float().requires_grad_()
    reason = tlay.unsupported_reason(u32, p32, n_mlp, precision)
    if reason is not None:
        pytest.skip(reason)
    got = value_and_grads(tlay.rg_coupling_layer, u32, ldj32, p32, n_mlp, inverse, recompute,
                          g_y.float(), g_ldj.float(), precision=precision)
    return relative_errors(got, exact, ldj)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("inverse,recompute", [(False, False), (True, True)])
def test_precision_modes_on_cuda(seed, precision, inverse, recompute):
    errors = _cuda_case(precision, inverse, recompute)
    print(f"{precision}: relative errors {errors}")
    assert all(errors[key] < TOL[precision][key] for key in errors), errors


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_backward_is_deterministic(seed):
    params = make_params(3, 4, 512, 4, 2, torch.float32, "cuda")
    u, ldj = layer_inputs(64, 64, 3, 4, torch.float32, "cuda")
    g_y, g_ldj = torch.randn_like(u), torch.randn_like(ldj)
    runs = [value_and_grads(tlay.rg_coupling_layer, u, ldj, params, 2, False, False, g_y, g_ldj,
                            precision="bf16")[2] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad,recompute,stored", [(False, False, False), (True, False, True), (True, True, False)])
def test_activations_are_kept_only_for_a_backward_pass(seed, monkeypatch, grad, recompute, stored):
    calls = []
    step_forward = tlay._k.step_forward

    def spy(*args):
        calls.append(args[13])  # the `store` flag
        return step_forward(*args)

    monkeypatch.setattr(tlay._k, "step_forward", spy)
    params = make_params(1, 2, 5, 1, 1, torch.float32, DEVICE)
    u, ldj = layer_inputs(1, 3, 1, 2, torch.float32, DEVICE)
    with torch.set_grad_enabled(grad):
        tlay.rg_coupling_layer(u, ldj, params, 1, False, recompute)
    assert calls == [stored, stored]


def test_bf16_saved_activations(seed, monkeypatch):
    # bf16 mode saves activations and output gradients in bf16; here that storage runs with exact
    # products in the interpreter (which rounds bf16 by truncation: a biased, larger error than
    # the GPU's round-to-nearest). The forward is untouched; the gradients stay within bf16's bound.
    monkeypatch.setattr(tlay, "save_dtype", lambda u, precision: torch.bfloat16)
    params = make_params(3, 4, 40, 2, 2, torch.float32, DEVICE)
    u, ldj = layer_inputs(2, 7, 3, 4, torch.float32, DEVICE)
    g_y, g_ldj = torch.randn_like(u), torch.randn_like(ldj)
    for inverse, recompute in ((False, False), (True, True)):
        got = value_and_grads(tlay.rg_coupling_layer, u, ldj, params, 2, inverse, recompute, g_y, g_ldj)
        want = value_and_grads(reference_layer, u, ldj, params, 2, inverse, recompute, g_y, g_ldj)
        errors = relative_errors(got, want, ldj)
        assert errors["u"] < TOL["fp32"]["u"] and errors["ldj"] < TOL["fp32"]["ldj"], errors
        assert 1e-4 < errors["grads"] < TOL["bf16"]["grads"], errors  # rounded, within bounds
