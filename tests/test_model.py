"""The reference RG-Flow (backend "torch"): fixture conformance, invertibility, exact
log-determinants and input validation."""
import pytest
import torch

import rgflow_fast as rf
from conftest import FAST_BACKENDS, randomize_


@pytest.fixture(autouse=True)
def _reference():
    with rf.use_backend("torch"):
        yield


def small_model(L=8, C=2, k=4, dtype=torch.float64, **kw):
    kw = {"n_layers": 2, "n_res_blocks": 1, "n_mlp": 1, "hidden": 8, **kw}
    return randomize_(rf.RGFlow(L, C, kernel_size=k, **kw).to(dtype))


def test_fixture_conformance(fixture_data):
    model = rf.from_original(fixture_data["state_dict"], fixture_data["config"])
    z, ldj = model(fixture_data["x"])
    log_prob = model.log_prob(fixture_data["x"])
    for ours, theirs in ((z, fixture_data["z"]), (ldj, fixture_data["ldj"]), (log_prob, fixture_data["log_prob"])):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10 * theirs.abs().max().item())


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)]
)
@pytest.mark.parametrize("L,k,C", [(16, 4, 3), (8, 2, 1), (4, 4, 2)])
def test_inverse_undoes_forward(seed, dtype, tol, L, k, C):
    model = small_model(L, C, k, dtype)
    x = torch.randn(3, C, L, L, dtype=dtype)
    z, ldj = model(x)
    assert (z - x).abs().max() > 0.1, "randomised model should not be the identity"
    x_back, inv_ldj = model.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=tol, atol=tol)
    torch.testing.assert_close(inv_ldj, -ldj, rtol=tol, atol=tol * ldj.abs().max().item())


@pytest.mark.parametrize("L,k,C", [(4, 2, 1), (4, 2, 2), (8, 4, 1), (8, 4, 2), (8, 2, 1), (4, 4, 2)])
def test_flow_logdet_is_log_abs_det_jacobian(seed, L, k, C):
    model = small_model(L, C, k)
    x = torch.randn(1, C, L, L, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: model(v)[0], x).reshape(x.numel(), x.numel())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(model(x)[1], logabsdet.reshape(1), rtol=1e-9, atol=1e-9)


def test_fresh_model_is_identity_and_log_prob_is_prior():
    model = rf.RGFlow(8, 1, kernel_size=4, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=4).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    z, ldj = model(x)
    assert torch.equal(z, x) and torch.equal(ldj, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(model.log_prob(x), model.prior.log_prob(x))


def test_default_config_is_the_paper_celeba_config():
    model = rf.RGFlow(32, 3)
    assert model.config["n_layers"] == [8, 6, 4, 2]
    assert model.config["n_res_blocks"] == [4] * 4 and model.config["hidden"] == [512] * 4
    assert len(model.blocks) == 8
    # the paper's CelebA-32 model: 100.6 M parameters
    assert round(model.num_parameters() / 1e6, 1) == 100.6


def test_per_level_sizes_and_config_round_trip():
    model = rf.RGFlow(16, 2, kernel_size=2, n_layers=(1, 2, 1, 3), hidden=[4, 6, 8, 10], n_mlp=1, n_res_blocks=1)
    assert [len(b.layers) for b in model.blocks] == [1, 1, 2, 2, 1, 1, 3, 3]
    assert model.blocks[4].layers[0].s_net.res_blocks[0][1].weight_v.shape == (8, 8)
    again = rf.RGFlow(**model.config)
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()


def test_sample_shapes_dtype_and_temperature(seed):
    model = small_model(8, 2, 4, torch.float32)
    x = model.sample(5)
    assert x.shape == (5, 2, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    g = torch.Generator().manual_seed(1)
    a = model.sample(3, temperature=[0.5, 1.0], generator=g)
    g.manual_seed(1)
    b = model.sample(3, temperature=[0.5, 1.0], generator=g)
    assert torch.equal(a, b)
    # zero-temperature-like sampling shrinks the latents: the latents of a sample are scaled
    z_cold = model(model.sample(400, temperature=0.1))[0]
    assert z_cold.std() < 0.2


@pytest.mark.parametrize(
    "make_input,error,match",
    [
        (lambda: torch.randn(2, 8, 8, dtype=torch.float64), ValueError, r"shape \(B, 2, 8, 8\)"),
        (lambda: torch.randn(2, 3, 8, 8, dtype=torch.float64), ValueError, r"shape \(B, 2, 8, 8\)"),
        (lambda: torch.randn(2, 2, 8, 4, dtype=torch.float64), ValueError, r"shape \(B, 2, 8, 8\)"),
        (lambda: torch.randn(2, 2, 16, 16, dtype=torch.float64), ValueError, r"shape \(B, 2, 8, 8\)"),
        (lambda: torch.randn(2, 2, 8, 8, dtype=torch.float32), ValueError, "float32 on cpu but the model is torch.float64"),
        (lambda: torch.full((2, 2, 8, 8), float("nan"), dtype=torch.float64), ValueError, "NaN or inf"),
        (lambda: [[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_errors(make_input, error, match):
    model = small_model(8, 2, 4)
    for call in (model.forward, model.inverse, model.log_prob):
        with pytest.raises(error, match=match):
            call(make_input())


def test_nan_passes_through_when_checks_are_off():
    model = small_model(8, 2, 4)
    model.check_inputs = False
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    assert torch.isnan(model(x)[0]).any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"image_size": 12}, "image_size must be kernel_size"),
        ({"kernel_size": 3}, "kernel_size must be even"),
        ({"n_layers": (1, 2, 3)}, "one value per RG level"),
        ({"hidden": 0}, "positive ints"),
        ({"channels": 0}, "channels must be a positive int"),
        ({"prior": "cauchy"}, "unknown prior"),
        ({"temperature": -1.0}, "temperatures must be finite and > 0"),
        ({"temperature": [1.0]}, "one value per RG level"),
    ],
)
def test_bad_config_errors(kwargs, match):
    config = {"image_size": 8, "channels": 1, "kernel_size": 4, "n_layers": 1, "hidden": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        rf.RGFlow(**config)


def test_gradients_reach_every_parameter(seed):
    model = small_model(8, 2, 4, torch.float64)
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    model.log_prob(x).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("backend", ["torch"] + FAST_BACKENDS)
def test_empty_batch_gives_empty_outputs(backend):
    model = rf.RGFlow(8, 2, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=4)
    empty = torch.zeros(0, 2, 8, 8)
    with rf.use_backend(backend):
        z, ldj = model(empty)
        x, inv_ldj = model.inverse(empty)
        samples = model.sample(0)
        log_p = model.log_prob(empty)
    assert z.shape == x.shape == samples.shape == (0, 2, 8, 8)
    assert ldj.shape == inv_ldj.shape == log_p.shape == (0,)
