"""normflows adapters: the wrapped model equals ours in normflows' conventions (forward is
latent -> data), trains inside a NormalizingFlow beside normflows' own layers, and the fused
coupling equals normflows' MaskedAffineFlow with a tanh-ended scale net."""
import pytest
import torch
from torch import nn

nf = pytest.importorskip("normflows", reason="the normflows adapters need normflows: pip install 'rgflow-fast[normflows]'")

import rgflow_fast as rf  # noqa: E402
from rgflow_fast.interop.normflows import RGFlowLayer, RGFlowPrior  # noqa: E402

from conftest import assert_training_lowers_loss, randomize_  # noqa: E402
from normflows.distributions.distribution_test import DistributionTest  # noqa: E402
from normflows.flows.flow_test import FlowTest  # noqa: E402
from test_nn import HARNESS_SCALE, harness_tolerance, transformed_mask  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def float64_default():
    """normflows accumulates log-dets in zeros of the default dtype; make it float64 so that
    the comparisons below can be exact."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def small_model(prior="laplace", temperature=1.0, dtype=torch.float64, image_size=8, n_layers=1, scale=0.3):
    model = rf.RGFlow(image_size, 2, kernel_size=4, n_layers=n_layers, n_res_blocks=1, n_mlp=1, hidden=8,
                      prior=prior, temperature=temperature)
    return randomize_(model.to(dtype), scale)


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_wrapped_model_matches_ours(seed, prior):
    model = small_model(prior, temperature=[0.8, 1.3])
    flow = nf.NormalizingFlow(q0=RGFlowPrior(model), flows=[RGFlowLayer(model)])
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    z_ours, ldj = model(x)
    # normflows' inverse is data -> latent, with log|det dz/dx|
    z, log_det = flow.inverse_and_log_det(x)
    torch.testing.assert_close(z, z_ours, **TOL)
    torch.testing.assert_close(log_det, ldj, **TOL)
    torch.testing.assert_close(flow.log_prob(x), model.log_prob(x), **TOL)
    torch.testing.assert_close(flow.forward_kld(x), -model.log_prob(x).mean(), **TOL)
    # normflows' forward is latent -> data, with log|det dx/dz|
    x_back, log_det_fwd = flow.forward_and_log_det(z)
    x_ours, inv_ldj = model.inverse(z)
    torch.testing.assert_close(x_back, x_ours, **TOL)
    torch.testing.assert_close(log_det_fwd, inv_ldj, **TOL)
    torch.testing.assert_close(x_back, x, **TOL)
    # sampling: log q of the samples is the model's log-likelihood of them
    samples, log_q = flow.sample(4)
    assert samples.shape == (4, 2, 8, 8)
    torch.testing.assert_close(log_q, model.log_prob(samples), rtol=1e-9, atol=1e-9)


def test_prior_at_another_temperature(seed):
    model = small_model()
    q0 = RGFlowPrior(model.prior, temperature=[0.5, 2.0])
    z, log_p = q0(5)
    torch.testing.assert_close(log_p, model.prior.log_prob(z, [0.5, 2.0]), **TOL)
    torch.testing.assert_close(q0.log_prob(z), log_p, **TOL)


def test_one_layer_per_rg_block_is_the_model(seed):
    model = small_model()
    # normflows lists flows from the latent side: our last block first
    flow = nf.NormalizingFlow(RGFlowPrior(model), [RGFlowLayer(block) for block in reversed(model.blocks)])
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), model.log_prob(x), **TOL)
    z, ldj = model(x)
    torch.testing.assert_close(flow.inverse(x), z, **TOL)
    torch.testing.assert_close(flow.forward_and_log_det(z)[1], -ldj, **TOL)


def test_conditional_coupling_in_conditional_flow(seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.embed = nn.Linear(3, 4)

        def forward(self, v, context):
            return self.conv(v) + self.embed(context)[:, :, None, None]

    coupling = rf.nn.CheckerboardAffineCoupling(Net().double(), parity=0)
    model = small_model()
    flow = nf.ConditionalNormalizingFlow(RGFlowPrior(model), [RGFlowLayer(model), RGFlowLayer(coupling)])
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    context = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes none"):
        flow.log_prob(x, context)  # the RGFlow in the list is not conditional
    flow = nf.ConditionalNormalizingFlow(RGFlowPrior(model), [RGFlowLayer(coupling)])
    y, ldj = coupling(x, context)
    torch.testing.assert_close(flow.log_prob(x, context), ldj + model.prior.log_prob(y), **TOL)
    torch.testing.assert_close(flow.forward(y, context), x, **TOL)


@pytest.mark.parametrize("parity", [0, 1])
def test_fused_coupling_matches_masked_affine_flow(seed, parity):
    """normflows' MaskedAffineFlow is f(z) = b*z + (1-b)*(z*exp(s(b*z)) + t(b*z)) with no
    clamp; ending its scale net in tanh gives ours. Both compute the same map f in their
    forward; in a NormalizingFlow, RGFlowLayer(coupling) is Reverse(MaskedAffineFlow)."""
    C, L = 2, 6
    s_net = nn.Conv2d(C, C, 3, padding=1).double()
    t_net = nn.Conv2d(C, C, 3, padding=1).double()

    class PairNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.s, self.t = s_net, t_net

        def forward(self, v):
            return self.s(v), self.t(v)

    coupling = rf.nn.CheckerboardAffineCoupling(PairNet(), parity)
    keep = (~transformed_mask(L, parity, torch.empty(0))).double().expand(C, L, L)
    theirs = nf.flows.MaskedAffineFlow(keep, t=t_net, s=nn.Sequential(s_net, nn.Tanh()))
    x = torch.randn(3, C, L, L, dtype=torch.float64, requires_grad=True)
    y, ldj = coupling(x)
    y_theirs, log_det = theirs(x)
    torch.testing.assert_close(y, y_theirs, **TOL)
    torch.testing.assert_close(ldj, log_det, **TOL)
    w = torch.randn(y.shape, dtype=y.dtype)
    params = [x, *s_net.parameters(), *t_net.parameters()]
    for a, b in zip(torch.autograd.grad((y * w).sum() + ldj.sum(), params),
                    torch.autograd.grad((y_theirs * w).sum() + log_det.sum(), params)):
        torch.testing.assert_close(a, b, **TOL)
    x_back, inv_ldj = coupling.inverse(y)
    x_theirs, inv_log_det = theirs.inverse(y)
    torch.testing.assert_close(x_back, x_theirs, **TOL)
    torch.testing.assert_close(inv_ldj, inv_log_det, **TOL)
    reversed_theirs = nf.flows.Reverse(theirs)
    for ours_out, theirs_out in ((RGFlowLayer(coupling)(y), reversed_theirs(y)),
                                 (RGFlowLayer(coupling).inverse(x), reversed_theirs.inverse(x))):
        torch.testing.assert_close(ours_out[0], theirs_out[0], **TOL)
        torch.testing.assert_close(ours_out[1], theirs_out[1], **TOL)


def test_training_inside_normalizing_flow_lowers_the_loss(seed):
    """Our RG blocks and couplings between normflows' ActNorm and 1x1 convolutions."""
    C, L = 2, 8
    model = rf.RGFlow(L, C, kernel_size=4, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=8)
    net = nn.Sequential(nn.Conv2d(C, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 2 * C, 3, padding=1))
    flows = [
        RGFlowLayer(model.blocks[3]),
        nf.flows.Invertible1x1Conv(C),
        RGFlowLayer(rf.nn.CheckerboardAffineCoupling(net, parity=1)),
        RGFlowLayer(model.blocks[0]),
        nf.flows.ActNorm((C, 1, 1)),
    ]
    flow = nf.NormalizingFlow(RGFlowPrior(model), flows)
    assert_training_lowers_loss(lambda x: flow.forward_kld(x) / (C * L * L), flow, C, L)


# normflows' own harnesses, installed with the library: FlowTest (forward, inverse, dtype and
# shape kept, round trip, log-dets summing to 0) and DistributionTest.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wrapped", ["model", "block", "coupling"])
def test_normflows_flow_harness(seed, dtype, wrapped):
    torch.set_default_dtype(dtype)  # normflows builds its zeros in the default dtype
    model = small_model(dtype=dtype, image_size=16, n_layers=2, scale=HARNESS_SCALE)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 3, padding=1))
    module = {
        "model": model,
        "block": model.blocks[2],
        "coupling": rf.nn.CheckerboardAffineCoupling(net.to(dtype), parity=1),
    }[wrapped]
    layer = RGFlowLayer(module)
    z = 2 * torch.randn(4, 2, 16, 16, dtype=dtype)
    harness = FlowTest()
    tol = harness_tolerance(layer(z)[1], dtype)
    harness.checkForwardInverse(layer, z, **tol)
    # and from the data side, through a NormalizingFlow of normflows' own and our layers
    flow = nf.NormalizingFlow(RGFlowPrior(model), [layer, nf.flows.ActNorm((2, 1, 1)), RGFlowLayer(model.blocks[0])])
    x, log_det = flow.forward_and_log_det(z)
    z_back, inv_log_det = flow.inverse_and_log_det(x)
    tol = harness_tolerance(log_det, dtype)
    torch.testing.assert_close(z_back, z, **tol)
    torch.testing.assert_close(log_det + inv_log_det, torch.zeros_like(log_det), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_normflows_distribution_harness(seed, dtype, prior):
    torch.set_default_dtype(dtype)
    q0 = RGFlowPrior(small_model(prior, temperature=[0.7, 1.4], dtype=dtype))
    harness = DistributionTest()
    z, log_p = harness.checkForward(q0, 5)
    assert z.shape == (5, 2, 8, 8) and z.dtype == dtype
    harness.checkLogProb(q0, z)
    harness.checkSample(q0, 3)
    harness.checkForwardLogProb(q0, 7, **harness_tolerance(log_p, dtype))


def test_forward_kld_is_float32_unless_the_default_dtype_is_float64(seed):
    """normflows' forward_kld sums the log-dets into zeros of the default dtype, so for a
    float64 model under the usual float32 default it equals -log_prob(x).mean() only to
    float32 precision; with a float64 default it is exact."""
    model = small_model()
    flow = nf.NormalizingFlow(q0=RGFlowPrior(model), flows=[RGFlowLayer(model)])
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    expected = -model.log_prob(x).mean()
    torch.testing.assert_close(flow.forward_kld(x), expected, **TOL)  # default float64 here
    torch.set_default_dtype(torch.float32)
    kld = flow.forward_kld(x)
    assert kld.dtype == torch.float32
    torch.testing.assert_close(kld.double(), expected, rtol=4 * torch.finfo(torch.float32).eps, atol=0)
    torch.testing.assert_close(flow.log_prob(x), model.log_prob(x), **TOL)  # log_prob keeps x's dtype


def test_bad_construction_says_what_to_do():
    with pytest.raises(TypeError, match="invertible nn.Module"):
        RGFlowLayer(nn.Identity())
    with pytest.raises(TypeError, match="RGFlow or its prior"):
        RGFlowPrior(nn.Identity())
