"""nflows adapters: the wrapped model equals ours in nflows' conventions (forward is data ->
noise), trains inside an nflows Flow beside nflows' own transforms, and the fused coupling
equals nflows' AffineCouplingTransform on a checkerboard mask with our scale map."""
import pytest
import torch
from torch import nn

pytest.importorskip("nflows", reason="the nflows adapters need nflows: pip install 'rgflow-fast[nflows]'")
from nflows.distributions.normal import StandardNormal  # noqa: E402
from nflows.flows.base import Flow  # noqa: E402
from nflows.transforms.base import CompositeTransform, InverseTransform  # noqa: E402
from nflows.transforms.conv import OneByOneConvolution  # noqa: E402
from nflows.transforms.coupling import AffineCouplingTransform  # noqa: E402
from nflows.transforms.normalization import ActNorm  # noqa: E402

import rgflow_fast as rf  # noqa: E402
from rgflow_fast.interop.nflows import RGFlowDistribution, RGFlowTransform  # noqa: E402

from conftest import assert_training_lowers_loss, randomize_  # noqa: E402
from test_nn import HARNESS_SCALE, harness_tolerance, transformed_mask  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)


def small_model(prior="laplace", temperature=1.0, dtype=torch.float64, image_size=8, n_layers=1, scale=0.3):
    model = rf.RGFlow(image_size, 2, kernel_size=4, n_layers=n_layers, n_res_blocks=1, n_mlp=1, hidden=8,
                      prior=prior, temperature=temperature)
    return randomize_(model.to(dtype), scale)


class ContextNet(nn.Module):
    """Whole-image conditioner: (B, C, L, L) + context (B, K) -> (B, 2C, L, L)."""

    def __init__(self, channels, context_features):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.embed = nn.Linear(context_features, 2 * channels)

    def forward(self, v, context):
        return self.conv(v) + self.embed(context)[:, :, None, None]


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_wrapped_model_matches_ours(seed, prior):
    model = small_model(prior, temperature=[1.2, 0.7])
    flow = Flow(RGFlowTransform(model), RGFlowDistribution(model))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    z_ours, ldj = model(x)
    z, logabsdet = flow.transform_to_noise(x), flow._transform(x)[1]
    torch.testing.assert_close(z, z_ours, **TOL)
    torch.testing.assert_close(logabsdet, ldj, **TOL)
    torch.testing.assert_close(flow.log_prob(x), model.log_prob(x), **TOL)
    x_back, inv_logabsdet = flow._transform.inverse(z)
    x_ours, inv_ldj = model.inverse(z)
    torch.testing.assert_close(x_back, x_ours, **TOL)
    torch.testing.assert_close(inv_logabsdet, inv_ldj, **TOL)
    torch.testing.assert_close(x_back, x, **TOL)
    samples, log_prob = flow.sample_and_log_prob(4)
    assert samples.shape == (4, 2, 8, 8)
    torch.testing.assert_close(log_prob, model.log_prob(samples), rtol=1e-9, atol=1e-9)


def test_distribution_sample_layout_and_temperature(seed):
    model = small_model()
    distribution = RGFlowDistribution(model.prior, temperature=0.5)
    context = torch.zeros(3, 1)
    samples = distribution.sample(4, context=context)
    assert samples.shape == (3, 4, 2, 8, 8)
    z = samples.reshape(12, 2, 8, 8)
    torch.testing.assert_close(distribution.log_prob(z), model.prior.log_prob(z, 0.5), **TOL)


def test_one_transform_per_rg_block_is_the_model(seed):
    model = small_model()
    # nflows composes from the data side, as our blocks run
    transform = CompositeTransform([RGFlowTransform(block) for block in model.blocks])
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    z, logabsdet = transform(x)
    z_ours, ldj = model(x)
    torch.testing.assert_close(z, z_ours, **TOL)
    torch.testing.assert_close(logabsdet, ldj, **TOL)
    x_back, inv_logabsdet = transform.inverse(z)
    torch.testing.assert_close(x_back, x, **TOL)
    torch.testing.assert_close(inv_logabsdet, -ldj, **TOL)


class TanhAffineCouplingTransform(AffineCouplingTransform):
    """nflows' affine coupling with our scale map: nflows 0.14 fixes the scale to
    sigmoid(a + 2) + 1e-3 (no option), so no built-in clamp equals exp(tanh a); only the
    scale map is replaced, the split, conditioning and log-det are nflows' own."""

    def _scale_and_shift(self, transform_params):
        shift = transform_params[:, : self.num_transform_features, ...]
        unconstrained = transform_params[:, self.num_transform_features:, ...]
        return torch.exp(torch.tanh(unconstrained)), shift


class FlatNet(nn.Module):
    """nflows transform net: identity features (B, D/2) + context (B, K) -> (B, 2 * D/2)
    laid out as nflows reads them, [shift, unconstrained scale]."""

    def __init__(self, d_in, d_out, context_features):
        super().__init__()
        self.linear = nn.Linear(d_in + context_features, d_out)

    def forward(self, inputs, context):
        return self.linear(torch.cat([inputs, context], dim=1))


class ImageNet(nn.Module):
    """The same nflows net as our conditioner: from the masked image (B, C, L, L), take the
    kept (identity) features, run the net, put (s, t) at the transformed features."""

    def __init__(self, flat_net, identity, transform):
        super().__init__()
        self.flat_net, self.identity, self.transform = flat_net, identity, transform

    def forward(self, v, context):
        params = self.flat_net(v.flatten(1)[:, self.identity], context)
        shift, scale = params.chunk(2, dim=1)
        s, t = torch.zeros_like(v.flatten(1)), torch.zeros_like(v.flatten(1))
        s[:, self.transform], t[:, self.transform] = scale, shift
        return s.view_as(v), t.view_as(v)


@pytest.mark.parametrize("parity", [0, 1])
def test_fused_coupling_matches_affine_coupling_transform(seed, parity):
    """nflows couples a 1-D feature mask (channels for images), so the image is flattened to
    (B, C*L*L) with a checkerboard mask; the context goes to the net in both."""
    C, L, K = 2, 4, 3
    mask = transformed_mask(L, parity, torch.empty(0)).expand(C, L, L).flatten().long()
    theirs = TanhAffineCouplingTransform(mask, lambda d_in, d_out: FlatNet(d_in, d_out, K)).double()
    net = ImageNet(theirs.transform_net, theirs.identity_features, theirs.transform_features)
    coupling = rf.nn.CheckerboardAffineCoupling(net, parity)
    x = torch.randn(3, C, L, L, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, K, dtype=torch.float64, requires_grad=True)
    y, ldj = coupling(x, context)
    y_theirs, logabsdet = theirs(x.flatten(1), context)
    torch.testing.assert_close(y.flatten(1), y_theirs, **TOL)
    torch.testing.assert_close(ldj, logabsdet, **TOL)
    w = torch.randn(y_theirs.shape, dtype=y.dtype)
    params = [x, context, *theirs.parameters()]
    for a, b in zip(torch.autograd.grad((y.flatten(1) * w).sum() + ldj.sum(), params),
                    torch.autograd.grad((y_theirs * w).sum() + logabsdet.sum(), params)):
        torch.testing.assert_close(a, b, **TOL)
    x_back, inv_ldj = RGFlowTransform(coupling).inverse(y, context)
    x_theirs, inv_logabsdet = theirs.inverse(y_theirs, context)
    torch.testing.assert_close(x_back.flatten(1), x_theirs, **TOL)
    torch.testing.assert_close(inv_ldj, inv_logabsdet, **TOL)
    torch.testing.assert_close(x_back, x, **TOL)


def test_training_inside_nflows_flow_lowers_the_loss(seed):
    """Our RG blocks and couplings between nflows' ActNorm and 1x1 convolutions."""
    C, L = 2, 8
    model = rf.RGFlow(L, C, kernel_size=4, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=8)
    net = nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2 * C, 3, padding=1))
    transform = CompositeTransform([
        ActNorm(C),
        RGFlowTransform(model.blocks[0]),
        OneByOneConvolution(C),
        RGFlowTransform(rf.nn.CheckerboardAffineCoupling(net, parity=1)),
        RGFlowTransform(model.blocks[3]),
    ])
    flow = Flow(transform, StandardNormal([C, L, L]))
    assert_training_lowers_loss(lambda x: -flow.log_prob(x).mean() / (C * L * L), flow, C, L)


def test_rg_blocks_in_a_conditional_flow_ignore_the_context(seed):
    """nflows passes the context to every transform; ours that take none ignore it, as
    nflows' unconditional transforms do, and the conditional coupling uses it."""
    model = small_model()
    coupling = rf.nn.CheckerboardAffineCoupling(ContextNet(2, 3).double(), parity=1)
    transform = CompositeTransform([
        RGFlowTransform(model.blocks[0]),
        ActNorm(2).double(),
        RGFlowTransform(coupling),
        RGFlowTransform(model),
    ])
    flow = Flow(transform, RGFlowDistribution(model))
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    context = torch.randn(3, 3, dtype=torch.float64)
    # by hand: only the coupling sees the context
    y, ldj = model.blocks[0](x)
    y, step = transform._transforms[1](y)
    ldj = ldj + step
    y, step = coupling(y, context)
    ldj = ldj + step
    z, step = model(y)
    ldj = ldj + step
    torch.testing.assert_close(flow.transform_to_noise(x, context), z, **TOL)
    torch.testing.assert_close(flow.log_prob(x, context), ldj + model.prior.log_prob(z), **TOL)
    other = torch.randn(3, 3, dtype=torch.float64)
    assert not torch.allclose(flow.log_prob(x, other), flow.log_prob(x, context))
    for wrapped in (RGFlowTransform(model), RGFlowTransform(model.blocks[2])):
        for direction in (wrapped, wrapped.inverse):
            with_context, without = direction(x, context), direction(x)
            assert torch.equal(with_context[0], without[0]) and torch.equal(with_context[1], without[1])
    samples = flow.sample(4, context)
    assert samples.shape == (3, 4, 2, 8, 8)
    x_back = transform.inverse(flow.transform_to_noise(x, context), context)[0]
    torch.testing.assert_close(x_back, x, **TOL)


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_distribution_mean_is_the_prior_mean(seed, prior):
    """As nflows' StandardNormal: mean() is zeros of the event shape, (context_size, ...)
    with a context; it is the mean of the samples at every temperature."""
    model = small_model(prior, temperature=[0.6, 1.7], dtype=torch.float32)
    distribution = RGFlowDistribution(model)
    mean = distribution.mean()
    assert mean.shape == (2, 8, 8) and mean.dtype == torch.float32 and not mean.any()
    assert distribution.mean(torch.zeros(5, 1)).shape == (5, 2, 8, 8)
    reference = StandardNormal([2, 8, 8])
    assert reference.mean().shape == mean.shape
    assert reference.mean(torch.zeros(5, 1)).shape == distribution.mean(torch.zeros(5, 1)).shape
    n = 4000
    samples = distribution.sample(n).double()
    # 5 standard errors of the sample mean (std = the level's temperature)
    std = model.prior.scale_map().double() / rf.priors.PRIORS[prior]
    assert ((samples.mean(dim=0) - mean.double()).abs() < 5 * std / n**0.5).float().mean() > 0.99


# nflows' own harness (tests/transforms/transform_test.py, TransformTest, not installed with
# the library) written out: InverseTransform then the transform is the identity, outputs and
# log-dets finite, of the right shapes, log-det 0.
def assert_forward_inverse_are_consistent(transform, inputs, context=None):
    identity = CompositeTransform([InverseTransform(transform), transform])
    outputs, logabsdet = identity(inputs, context)
    for tensor, shape in ((outputs, inputs.shape), (logabsdet, inputs.shape[:1])):
        assert isinstance(tensor, torch.Tensor) and torch.isfinite(tensor).all()
        assert tensor.shape == shape and tensor.dtype == inputs.dtype
    tol = harness_tolerance(transform(inputs, context)[1], inputs.dtype)
    torch.testing.assert_close(outputs, inputs, **tol)
    torch.testing.assert_close(logabsdet, torch.zeros_like(logabsdet), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wrapped", ["model", "block", "coupling"])
def test_nflows_transform_harness(seed, dtype, wrapped):
    model = small_model(dtype=dtype, image_size=16, n_layers=2, scale=HARNESS_SCALE)
    module = {
        "model": model,
        "block": model.blocks[3],
        "coupling": rf.nn.CheckerboardAffineCoupling(ContextNet(2, 3).to(dtype), parity=0),
    }[wrapped]
    x = 2 * torch.randn(4, 2, 16, 16, dtype=dtype)
    context = torch.randn(4, 3, dtype=dtype)
    assert_forward_inverse_are_consistent(RGFlowTransform(module), x, context)
    if wrapped != "coupling":
        assert_forward_inverse_are_consistent(RGFlowTransform(module), x)


def test_bad_construction_says_what_to_do():
    with pytest.raises(TypeError, match="invertible nn.Module"):
        RGFlowTransform(nn.Identity())
    with pytest.raises(TypeError, match="RGFlow or its prior"):
        RGFlowDistribution(nn.Identity())
