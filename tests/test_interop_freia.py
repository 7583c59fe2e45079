"""FrEIA adapters: the wrapped model equals ours in FrEIA's conventions (tuples, rev=True,
log-det of the direction run), trains inside a SequenceINN beside FrEIA's own layers, and
the fused coupling equals FrEIA's GLOWCouplingBlock on a checkerboard split."""
import pytest
import torch
from torch import nn

pytest.importorskip("FrEIA", reason="the FrEIA adapters need FrEIA: pip install 'rgflow-fast[freia]'")
import FrEIA.framework as Ff  # noqa: E402
import FrEIA.modules as Fm  # noqa: E402

import rgflow_fast as rf  # noqa: E402
from rgflow_fast.interop.freia import CheckerboardCouplingBlock, RGFlowBlock  # noqa: E402

from conftest import assert_training_lowers_loss, randomize_  # noqa: E402
from test_nn import HARNESS_SCALE, coupling_by_hand, harness_tolerance  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-10)


def small_model(channels=2, image_size=8, scale=0.3):
    model = rf.RGFlow(image_size, channels, kernel_size=4, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=8)
    return randomize_(model.double(), scale)


def conv_subnet(c_in, c_out):
    """A FrEIA-style subnet_constructor: (B, c_in, H, W) -> (B, c_out, H, W), random (not zero) init."""
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, c_out, 3, padding=1))


def test_rgflow_block_matches_model(seed):
    model = small_model()
    inn = Ff.SequenceINN(2, 8, 8)
    inn.append(RGFlowBlock, model=model)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    z, log_jac_det = inn(x)
    z_ours, ldj = model(x)
    torch.testing.assert_close(z, z_ours, **TOL)
    torch.testing.assert_close(log_jac_det, ldj, **TOL)
    # FrEIA has no prior object: log p(x) = prior.log_prob(z) + log_jac_det
    torch.testing.assert_close(model.prior.log_prob(z) + log_jac_det, model.log_prob(x), **TOL)
    x_back, log_jac_det_rev = inn(z, rev=True)
    x_ours, inv_ldj = model.inverse(z)
    torch.testing.assert_close(x_back, x_ours, **TOL)
    torch.testing.assert_close(log_jac_det_rev, inv_ldj, **TOL)
    torch.testing.assert_close(x_back, x, **TOL)
    torch.testing.assert_close(log_jac_det_rev, -log_jac_det, **TOL)
    # the module itself takes and returns FrEIA's tuples
    (z_module,), _ = inn[0]((x,))
    torch.testing.assert_close(z_module, z_ours, **TOL)


def test_one_wrapper_per_rg_block_is_the_model(seed):
    model = small_model()
    inn = Ff.SequenceINN(2, 8, 8)
    for block in model.blocks:
        inn.append(RGFlowBlock, model=block)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    z, log_jac_det = inn(x)
    z_ours, ldj = model(x)
    torch.testing.assert_close(z, z_ours, **TOL)
    torch.testing.assert_close(log_jac_det, ldj, **TOL)
    x_back, log_jac_det_rev = inn(z, rev=True)
    torch.testing.assert_close(x_back, x, **TOL)
    torch.testing.assert_close(log_jac_det_rev, -ldj, **TOL)


def test_conditional_coupling_takes_freia_conditions(seed):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.embed = nn.Linear(4, 6)

        def forward(self, v, context):
            return self.conv(v) + self.embed(context)[:, :, None, None]

    coupling = rf.nn.CheckerboardAffineCoupling(Net().double(), parity=1)
    inn = Ff.SequenceINN(3, 6, 6)
    inn.append(RGFlowBlock, cond=0, cond_shape=(4,), model=coupling)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    context = torch.randn(2, 4, dtype=torch.float64)
    z, log_jac_det = inn(x, c=[context])
    expected = coupling_by_hand(x, coupling.net, 1, context)
    torch.testing.assert_close(z, expected[0], **TOL)
    torch.testing.assert_close(log_jac_det, expected[1], **TOL)
    x_back, log_jac_det_rev = inn(z, c=[context], rev=True)
    torch.testing.assert_close(x_back, x, **TOL)
    torch.testing.assert_close(log_jac_det_rev, -log_jac_det, **TOL)


class ChannelPermutation(Fm.InvertibleModule):
    """A fixed channel permutation, the FrEIA way (FrEIA's own PermuteRandom draws its own)."""

    def __init__(self, dims_in, dims_c=None, perm=None):
        super().__init__(dims_in, dims_c)
        self.register_buffer("perm", perm)
        self.register_buffer("perm_inv", torch.argsort(perm))

    def forward(self, x, c=None, rev=False, jac=True):
        return (x[0][:, self.perm_inv if rev else self.perm],), 0.0

    def output_dims(self, input_dims):
        return input_dims


class SqueezedNet(nn.Module):
    """Runs a GLOW-block subnet, which sees the squeezed kept half, as a full-image
    conditioner: squeeze the masked image 2x2 into channels c*4 + 2i + j, take the kept
    channels, run the subnet, put its (s, t) at the transformed channels and unsqueeze."""

    def __init__(self, subnet, kept, moved):
        super().__init__()
        self.subnet, self.kept, self.moved = subnet, kept, moved

    def forward(self, v):
        squeezed = nn.functional.pixel_unshuffle(v, 2)
        a = self.subnet(squeezed[:, self.kept])
        s, t = torch.zeros_like(squeezed), torch.zeros_like(squeezed)
        s[:, self.moved], t[:, self.moved] = a.chunk(2, dim=1)
        return nn.functional.pixel_shuffle(s, 2), nn.functional.pixel_shuffle(t, 2)


def test_fused_coupling_matches_glow_coupling_block(seed):
    """FrEIA couples channel halves; a checkerboard split is IRevNetDownsampling (2x2 squeeze)
    then a permutation putting the i+j odd pixels first. GLOWCouplingBlock with clamp=1,
    clamp_activation="TANH" then transforms the odd half from the even one with subnet2,
    and the even half from the odd one with subnet1: our parity 0 then parity 1 couplings."""
    C, L = 2, 6
    odd = torch.tensor([c * 4 + q for c in range(C) for q in (1, 2)])  # squeezed (i, j) = (0, 1), (1, 0)
    even = torch.tensor([c * 4 + q for c in range(C) for q in (0, 3)])
    subnets = []

    def constructor(c_in, c_out):
        subnets.append(conv_subnet(c_in, c_out).double())
        return subnets[-1]

    inn = Ff.SequenceINN(C, L, L)
    inn.append(Fm.IRevNetDownsampling)
    inn.append(ChannelPermutation, perm=torch.cat([odd, even]))
    inn.append(Fm.GLOWCouplingBlock, subnet_constructor=constructor, clamp=1.0, clamp_activation="TANH")
    inn.append(ChannelPermutation, perm=torch.argsort(torch.cat([odd, even])))
    inn.append(Fm.IRevNetUpsampling)
    inn.double()
    subnet1, subnet2 = subnets
    ours = [
        rf.nn.CheckerboardAffineCoupling(SqueezedNet(subnet2, even, odd), parity=0),
        rf.nn.CheckerboardAffineCoupling(SqueezedNet(subnet1, odd, even), parity=1),
    ]
    x = torch.randn(3, C, L, L, dtype=torch.float64, requires_grad=True)
    z, log_jac_det = inn(x)
    y, ldj = x, 0
    for coupling in ours:
        y, step = coupling(y)
        ldj = ldj + step
    torch.testing.assert_close(y, z, **TOL)
    torch.testing.assert_close(ldj, log_jac_det, **TOL)
    w = torch.randn(z.shape, dtype=z.dtype)
    params = [x, *subnet1.parameters(), *subnet2.parameters()]
    for a, b in zip(torch.autograd.grad((z * w).sum() + log_jac_det.sum(), params),
                    torch.autograd.grad((y * w).sum() + ldj.sum(), params)):
        torch.testing.assert_close(a, b, **TOL)
    x_back, log_jac_det_rev = inn(z, rev=True)
    for coupling in reversed(ours):
        y, step = coupling.inverse(y)
        ldj = ldj + step
    torch.testing.assert_close(y, x_back, **TOL)
    torch.testing.assert_close(y, x, **TOL)
    torch.testing.assert_close(log_jac_det_rev, -log_jac_det, **TOL)
    torch.testing.assert_close(ldj, torch.zeros_like(ldj), **TOL)


def test_checkerboard_coupling_block_with_conditions(seed):
    C, L = 3, 4
    dims_c = [(2, L, L), (1, L, L)]
    block = CheckerboardCouplingBlock([(C, L, L)], dims_c=dims_c, subnet_constructor=conv_subnet).double()
    assert block.output_dims([(C, L, L)]) == [(C, L, L)]
    x = torch.randn(2, C, L, L, dtype=torch.float64)
    c = [torch.randn(2, *shape, dtype=torch.float64) for shape in dims_c]
    (z,), log_jac_det = block((x,), c=c)
    # by hand: parity 0 then parity 1, each subnet fed [masked image, conditions] along channels
    y, ldj = x, 0
    for coupling in block.couplings:
        subnet = coupling.net.subnet
        y, step = coupling_by_hand(y, lambda v: subnet(torch.cat([v, *c], dim=1)), coupling.parity)
        ldj = ldj + step
    torch.testing.assert_close(z, y, **TOL)
    torch.testing.assert_close(log_jac_det, ldj, **TOL)
    (x_back,), log_jac_det_rev = block((z,), c=c, rev=True)
    torch.testing.assert_close(x_back, x, **TOL)
    torch.testing.assert_close(log_jac_det_rev, -log_jac_det, **TOL)


def test_training_inside_sequence_inn_lowers_the_loss(seed):
    """Our RG blocks and couplings between FrEIA's ActNorm and i-RevNet downsampling."""
    C, L = 2, 8
    model = rf.RGFlow(L, C, kernel_size=4, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=8)
    inn = Ff.SequenceINN(C, L, L)
    inn.append(Fm.ActNorm)
    inn.append(RGFlowBlock, model=model.blocks[0])
    inn.append(CheckerboardCouplingBlock, subnet_constructor=conv_subnet)
    inn.append(RGFlowBlock, model=model.blocks[1])
    inn.append(Fm.IRevNetDownsampling)
    inn.append(RGFlowBlock, model=rf.nn.CheckerboardAffineCoupling(conv_subnet(4 * C, 8 * C), parity=0))
    def loss_fn(x):
        z, log_jac_det = inn(x)
        return (0.5 * z.pow(2).flatten(1).sum(1) - log_jac_det).mean() / (C * L * L)

    assert_training_lowers_loss(loss_fn, inn, C, L)


def conditional_graph(dtype, C=2, L=8):
    """FrEIA's ConditioningTest graph with our modules: a whole RG-Flow, then a checkerboard
    coupling conditioned on an image condition, then a conditional coupling on RG patches
    conditioned on a vector, between FrEIA's own ActNorm and i-RevNet squeeze."""

    class PatchNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(C * 16 + 5, 2 * C * 16)

        def forward(self, v, context):
            out = self.linear(torch.cat([v.flatten(1), context], dim=1))
            return out.view(v.shape[0], 2 * C, 4, 4)

    model = small_model(C, L, HARNESS_SCALE)
    inp = Ff.InputNode(C, L, L, name="input")
    c1 = Ff.ConditionNode(1, L, L, name="c1")
    c2 = Ff.ConditionNode(5, name="c2")
    nodes = [inp]
    nodes.append(Ff.Node(nodes[-1], RGFlowBlock, {"model": model}, name="rgflow"))
    nodes.append(Ff.Node(nodes[-1], Fm.ActNorm, {}, name="actnorm"))
    nodes.append(Ff.Node(nodes[-1], CheckerboardCouplingBlock, {"subnet_constructor": conv_subnet},
                         conditions=c1, name="checkerboard::c1"))
    coupling = rf.nn.CheckerboardAffineCoupling(PatchNet(), parity=1, kernel_size=4, dilation=2, offset=2)
    nodes.append(Ff.Node(nodes[-1], RGFlowBlock, {"model": coupling}, conditions=c2, name="patches::c2"))
    nodes.append(Ff.Node(nodes[-1], Fm.IRevNetDownsampling, {}, name="squeeze"))
    nodes.append(Ff.OutputNode(nodes[-1], name="output"))
    inn = Ff.GraphINN(nodes + [c1, c2]).to(dtype)  # the subnets' default init is random, not identity
    batch = 4
    x = 2 * torch.randn(batch, C, L, L, dtype=dtype)
    c = [torch.randn(batch, 1, L, L, dtype=dtype), torch.randn(batch, 5, dtype=dtype)]
    inn(x, c=c)  # ActNorm initialises itself from the first batch
    return inn, x, c


# FrEIA's own harness (tests/test_conditioning.py, ConditioningTest; not installed with the
# library) written out: output shape and type, wrong conditions raise, inversion, and the
# log-det against FrEIA's numerical Jacobian (rtol 0.03, as there); plus a float64
# brute-force Jacobian, tight.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_freia_conditioning_harness(seed, dtype):
    inn, x, c = conditional_graph(dtype)
    z, log_jac_det = inn(x, c=c)
    assert isinstance(z, torch.Tensor) and z.shape == (4, 8, 4, 4) and z.dtype == dtype
    assert log_jac_det.shape == (4,)
    with pytest.raises(Exception):
        inn(x, c=[c[1], c[0]])
    with pytest.raises(Exception):
        inn(x, c=[c[0], torch.randn(4, 9, dtype=dtype)])
    with pytest.raises(Exception):
        inn(x, c=[torch.randn(4, 1, 8, 9, dtype=dtype), c[1]])
    x_back, log_jac_det_rev = inn(z, c=c, rev=True)
    tol = harness_tolerance(log_jac_det, dtype)
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(log_jac_det + log_jac_det_rev, torch.zeros_like(log_jac_det), **tol)
    with torch.no_grad():  # see docs/interop_freia.md: with grad on, its result holds every pass's graph
        numerical = inn.log_jacobian_numerical(x, c=c, h=1e-3)
    torch.testing.assert_close(numerical.to(dtype), log_jac_det.detach(), rtol=0.03, atol=float("inf"))
    if dtype == torch.float64:
        for b in range(2):
            jacobian = torch.autograd.functional.jacobian(
                lambda v: inn(v, c=[ci[b : b + 1] for ci in c])[0], x[b : b + 1]
            ).reshape(x[0].numel(), x[0].numel())
            torch.testing.assert_close(torch.linalg.slogdet(jacobian)[1], log_jac_det[b].detach(),
                                       rtol=1e-12, atol=1e-12)


# FrEIA's ComplexComputeGraph (tests/test_reversible_graph_net.py in its repository) with our
# modules on the branches: a channel split, a whole RG-Flow on one branch, a conditional
# checkerboard coupling and an RG block on the other, concatenation and Haar downsampling.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_freia_complex_compute_graph(seed, dtype):
    L = 8
    inp = Ff.InputNode(3, L, L, name="input")
    cond = Ff.ConditionNode(1, L, L, name="cond")
    split = Ff.Node(inp, Fm.Split, {"section_sizes": [1, 2], "dim": 0}, name="split1")
    one = Ff.Node(split.out0, RGFlowBlock, {"model": small_model(1, L, HARNESS_SCALE)}, name="rgflow")
    conv = Ff.Node(split.out1, CheckerboardCouplingBlock, {"subnet_constructor": conv_subnet}, conditions=cond,
                   name="conv")
    block = Ff.Node(conv, RGFlowBlock, {"model": small_model(2, L, HARNESS_SCALE).blocks[1]}, name="block")
    concat = Ff.Node([one.out0, block.out0], Fm.Concat, {"dim": 0}, name="concat")
    haar = Ff.Node(concat, Fm.HaarDownsampling, {}, name="haar")
    out = Ff.OutputNode(haar, name="output")
    inn = Ff.GraphINN([inp, cond, split, one, conv, block, concat, haar, out]).to(dtype)
    x = torch.randn(6, 3, L, L, dtype=dtype)
    c = [torch.randn(6, 1, L, L, dtype=dtype)]
    y, log_jac_det = inn(x, c=c)
    assert isinstance(y, torch.Tensor) and y.shape == (6, 12, L // 2, L // 2) and y.dtype == dtype
    x_back, log_jac_det_rev = inn(y, c=c, rev=True)
    tol = harness_tolerance(log_jac_det, dtype)
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(log_jac_det + log_jac_det_rev, torch.zeros_like(log_jac_det), **tol)
    if dtype == torch.float64:  # FrEIA's check (atol = rtol = 0.01, h = 1e-4) needs float64 differences
        with torch.no_grad():
            numerical = inn.log_jacobian_numerical(x, c=c)
        torch.testing.assert_close(numerical.to(dtype), log_jac_det.detach(), rtol=0.01, atol=0.01)


def test_bad_construction_says_what_to_do():
    model = small_model()
    with pytest.raises(TypeError, match="model=model"):
        RGFlowBlock([(2, 8, 8)])
    with pytest.raises(ValueError, match="does not match the model's image shape"):
        RGFlowBlock([(3, 8, 8)], model=model)
    with pytest.raises(ValueError, match="takes no context"):
        RGFlowBlock([(2, 8, 8)], dims_c=[(4,)], model=model)
    with pytest.raises(TypeError, match="invertible nn.Module"):
        RGFlowBlock([(2, 8, 8)], model=nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="subnet_constructor"):
        CheckerboardCouplingBlock([(2, 8, 8)])
    with pytest.raises(ValueError, match="even image side"):
        CheckerboardCouplingBlock([(2, 5, 5)], subnet_constructor=conv_subnet)
    with pytest.raises(ValueError, match="conditions must be images"):
        CheckerboardCouplingBlock([(2, 8, 8)], dims_c=[(4,)], subnet_constructor=conv_subnet)
