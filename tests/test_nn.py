"""rf.nn.CheckerboardAffineCoupling against the coupling written out by hand, on every backend;
and the docs pages' examples (docs/nn.md and docs/interop_*.md) run as written."""
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import rgflow_fast as rf
from rgflow_fast import reference
from rgflow_fast.geometry import block_specs
from rgflow_fast.model import RGBlock

from conftest import FAST_BACKENDS, randomize_

BACKENDS = ["torch"] + FAST_BACKENDS
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-11, atol=1e-11)}
DOCS = Path(__file__).resolve().parents[1] / "docs"


class ConvNet(nn.Module):
    """Whole-image conditioner: (B, C, L, L) [+ context (B, D)] -> (B, 2C, L, L)."""

    def __init__(self, channels, context_features=0):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1, padding_mode="circular")
        self.conv2 = nn.Conv2d(8, 2 * channels, 3, padding=1)
        self.embed = nn.Linear(context_features, 8) if context_features else None

    def forward(self, v, context=None):
        h = self.conv1(v)
        if context is not None:
            h = h + self.embed(context)[:, :, None, None]
        return self.conv2(torch.tanh(h))


class PairMLP(nn.Module):
    """Patch conditioner returning a pair: (N, C, k, k) [+ context (N, D)] -> (s, t)."""

    def __init__(self, features, context_features=0):
        super().__init__()
        self.s = nn.Linear(features + context_features, features)
        self.t = nn.Linear(features + context_features, features)

    def forward(self, v, context=None):
        h = v.flatten(1) if context is None else torch.cat([v.flatten(1), context], 1)
        return self.s(h).view_as(v), self.t(h).view_as(v)


def harness_tolerance(log_det, dtype):
    """Tolerances for the peer libraries' forward-inverse checks (``x`` round trip, and the
    log-dets of the two directions summing to 0) on models randomised at scale
    ``HARNESS_SCALE``. A log-det is a sum of many ``tanh s`` terms whose rounding error grows
    with its magnitude, so ``atol`` scales with ``|ldj|``: float32 then misses the peers'
    1e-5/1e-6 defaults by rounding alone once ``|ldj|`` is in the tens; float64 stays tight.
    Measured over 60 random models of 2×16×16 (float32 and float64 alike): log-det error up to
    12·eps·|ldj|, ``x`` up to 126 ulps; the bounds below leave a 5-8× margin. (Rounding is
    amplified by the model's conditioning — each block's inverse divides by the scales its
    forward multiplied — so a much harder perturbation, ``randomize_``'s default 0.3, makes
    some models lose 1e5 ulps in float32: a property of those models, not of the code.)"""
    eps = torch.finfo(dtype).eps
    return dict(rtol=1024 * eps, atol=64 * eps * max(1.0, float(log_det.detach().abs().max())))


HARNESS_SCALE = 0.2  # randomize_ scale of the harness models: far from identity, well conditioned


def transformed_mask(k, parity, like):
    """(k, k) bool: positions with a+b odd for parity 0, even for parity 1."""
    a = torch.arange(k, device=like.device)
    odd = (a[:, None] + a[None, :]) % 2 == 1
    return odd if parity == 0 else ~odd


def coupling_by_hand(u, net, parity, context=None):
    """The coupling on patches u (N, C, k, k), written out: returns (u', Σ tanh s per row)."""
    moved = transformed_mask(u.shape[-1], parity, u)
    v = torch.where(moved, torch.zeros_like(u), u)
    out = net(v) if context is None else net(v, context)
    s, t = out if isinstance(out, tuple) else out.chunk(2, dim=1)
    y = torch.where(moved, u * torch.exp(torch.tanh(s)) + t, u)
    return y, torch.where(moved, torch.tanh(s), torch.zeros_like(s)).sum(dim=(1, 2, 3))


def grads(outputs, inputs):
    y, ldj = outputs
    weights = torch.randn(y.shape, dtype=y.dtype)  # not randn_like: that follows y's strides
    ldj_weights = torch.arange(1.0, 1 + len(ldj), dtype=ldj.dtype)
    return torch.autograd.grad((y * weights).sum() + (ldj * ldj_weights).sum(), inputs)


def assert_grads_close(out_a, out_b, inputs, dtype):
    state = torch.random.get_rng_state()
    ga = grads(out_a, inputs)
    torch.random.set_rng_state(state)
    gb = grads(out_b, inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("conditional", [False, True])
def test_whole_image_matches_hand_written(seed, backend, dtype, parity, conditional):
    B, C, L, D = 3, 3, 6, 5
    net = ConvNet(C, D if conditional else 0).to(dtype)
    layer = rf.nn.CheckerboardAffineCoupling(net, parity)
    x = torch.randn(B, C, L, L, dtype=dtype).transpose(-1, -2).requires_grad_()  # non-contiguous
    context = torch.randn(B, D, dtype=dtype, requires_grad=True) if conditional else None
    inputs = [x, *net.parameters()] + ([context] if conditional else [])
    with rf.use_backend(backend):
        ours = layer(x, context)
        x_back, inv_ldj = layer.inverse(ours[0], context)
    expected = coupling_by_hand(x, net, parity, context)
    torch.testing.assert_close(ours[0], expected[0], **TOL[dtype])
    torch.testing.assert_close(ours[1], expected[1], **TOL[dtype])
    assert_grads_close(ours, expected, inputs, dtype)
    torch.testing.assert_close(x_back, x, **TOL[dtype])
    torch.testing.assert_close(inv_ldj, -ours[1], **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patches_with_context_match_hand_written(seed, backend, dtype):
    B, C, L, k, d, offset, D = 2, 2, 8, 2, 2, 1, 3
    P = (L // (k * d)) ** 2
    net = PairMLP(C * k * k, D).to(dtype)
    x = torch.randn(B, C, L, L, dtype=dtype, requires_grad=True)
    context = torch.randn(B, D, dtype=dtype, requires_grad=True)
    inputs = [x, context, *net.parameters()]
    for parity in (0, 1):
        layer = rf.nn.CheckerboardAffineCoupling(net, parity, kernel_size=k, dilation=d, offset=offset)
        with rf.use_backend(backend):
            ours = layer(x, context)
            x_back, inv_ldj = layer.inverse(ours[0], context)
        u = reference.rg_gather(x, k, d, offset)
        u, rows = coupling_by_hand(u, net, parity, context.repeat_interleave(P, dim=0))
        expected = reference.rg_scatter(u, x, k, d, offset), rows.view(B, P).sum(1)
        torch.testing.assert_close(ours[0], expected[0], **TOL[dtype])
        torch.testing.assert_close(ours[1], expected[1], **TOL[dtype])
        assert_grads_close(ours, expected, inputs, dtype)
        torch.testing.assert_close(x_back, x, **TOL[dtype])
        torch.testing.assert_close(inv_ldj, -ours[1], **TOL[dtype])


class LayerNets(nn.Module):
    """An RG-Flow coupling layer's (S_j, T_j) as one net returning the pair."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, v):
        return self.layer.nets(v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_of_couplings_is_an_rg_block(seed, backend):
    """RG-Flow's block = for each layer, parity 0 then parity 1 with the same nets."""
    C, L, k = 2, 8, 4
    spec = block_specs(L, k)[1]  # offset k/2: wraps around the image edge
    block = randomize_(RGBlock(spec, C, n_layers=2, n_res_blocks=1, n_mlp=1, hidden=8).double())
    couplings = [
        rf.nn.CheckerboardAffineCoupling(LayerNets(layer), parity, k, spec.dilation, spec.offset)
        for layer in block.layers
        for parity in (0, 1)
    ]
    x = torch.randn(3, C, L, L, dtype=torch.float64, requires_grad=True)
    with rf.use_backend("torch"):
        expected = block(x)
    with rf.use_backend(backend):
        y, ldj = x, 0
        for coupling in couplings:
            y, step = coupling(y)
            ldj = ldj + step
    torch.testing.assert_close(y, expected[0], **TOL[torch.float64])
    torch.testing.assert_close(ldj, expected[1], **TOL[torch.float64])
    assert_grads_close((y, ldj), expected, [x, *block.parameters()], torch.float64)


def test_bad_inputs_say_what_to_do():
    net = ConvNet(2)
    with pytest.raises(ValueError, match="parity"):
        rf.nn.CheckerboardAffineCoupling(net, 2)
    with pytest.raises(TypeError, match="callable"):
        rf.nn.CheckerboardAffineCoupling("conv", 0)
    with pytest.raises(ValueError, match="kernel_size=k"):
        rf.nn.CheckerboardAffineCoupling(net, 0, dilation=2)
    with pytest.raises(ValueError, match="kernel_size must be even"):
        rf.nn.CheckerboardAffineCoupling(net, 0, kernel_size=3)
    layer = rf.nn.CheckerboardAffineCoupling(net, 0)
    with pytest.raises(ValueError, match="even image side"):
        layer(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match=r"shape \(B, C, L, L\)"):
        layer(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="2C channels|one tensor of shape"):
        rf.nn.CheckerboardAffineCoupling(nn.Conv2d(2, 3, 1), 0)(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="s must have the input's shape"):
        rf.nn.CheckerboardAffineCoupling(lambda v: (v[..., :2], v), 0)(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="batch size first"):
        rf.nn.CheckerboardAffineCoupling(ConvNet(2, 3), 0)(torch.randn(2, 2, 4, 4), torch.randn(3, 3))


@pytest.mark.parametrize("adapter, library", [("freia", "FrEIA"), ("normflows", "normflows"), ("nflows", "nflows")])
def test_interop_without_its_library_names_the_extra(monkeypatch, adapter, library):
    import rgflow_fast.interop as interop

    monkeypatch.setitem(sys.modules, library, None)  # makes `import library` fail
    monkeypatch.delitem(sys.modules, f"rgflow_fast.interop.{adapter}", raising=False)
    monkeypatch.delitem(vars(interop), adapter, raising=False)  # delattr would trigger the lazy import
    with pytest.raises(ImportError, match=re.escape(f"pip install 'rgflow-fast[{adapter}]'")):
        importlib.import_module(f"rgflow_fast.interop.{adapter}")


DOC_PAGES = {
    "nn.md": None,
    "interop_freia.md": "FrEIA",
    "interop_normflows.md": "normflows",
    "interop_nflows.md": "nflows",
}


@pytest.mark.parametrize("page", sorted(DOC_PAGES))
def test_docs_example_runs(seed, page):
    """Each docs page's ```python blocks run, in order, as one script."""
    library = DOC_PAGES[page]
    if library is not None:
        pytest.importorskip(library, reason=f"{page} needs {library}: pip install 'rgflow-fast[interop]'")
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert blocks, f"docs/{page} has no python example"
    exec(compile("\n".join(blocks), str(DOCS / page), "exec"), {"__name__": "__docs__"})
