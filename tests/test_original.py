"""Loading and saving checkpoints of the original RG-Flow code."""
import pytest
import torch

import rgflow_fast as rf
from conftest import randomize_
from rgflow_fast.original import original_config


def test_round_trip_is_exact(fixture_data):
    sd = fixture_data["state_dict"]
    back = rf.to_original(rf.from_original(sd, fixture_data["config"]))
    assert back.keys() == sd.keys()
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_full_original_save_and_dataparallel_prefix_load(fixture_data):
    sd, config = fixture_data["state_dict"], fixture_data["config"]
    wrapped = {"flow": {"module." + k: v for k, v in sd.items()}, "optimizer": {}}
    model = rf.from_original(wrapped, config)
    with rf.use_backend("torch"):
        torch.testing.assert_close(model(fixture_data["x"])[0], fixture_data["z"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "config",
    [
        {"L": 8, "kernel_size": 2, "nchannels": 1, "prior": "gaussian", "nlayers": 1, "nresblocks": 1, "nmlp": 1, "nhidden": 4, "temperature": 0.7},
        {"L": 16, "kernel_size": 4, "nchannels": 2, "prior": "laplace", "nlayers": "2,1,1", "nresblocks": [1, 2, 1], "nmlp": 2, "nhidden": 6},
    ],
)
def test_any_original_config_round_trips(seed, config):
    ours = randomize_(rf.RGFlow(**rf.original.config_from_original(config)).double())
    sd = rf.to_original(ours)
    loaded = rf.from_original(sd, original_config(ours))
    assert loaded.prior.temperature == pytest.approx(ours.prior.temperature)
    x = torch.randn(2, config["nchannels"], config["L"], config["L"], dtype=torch.float64)
    with rf.use_backend("torch"):
        torch.testing.assert_close(loaded.log_prob(x), ours.log_prob(x), rtol=0, atol=0)
    # Laplace b = T/sqrt(2), Gaussian std = T, as the original stores them (the model was built
    # in float32, so T is float32-rounded)
    T = config.get("temperature", 1.0)
    expected = T / 2**0.5 if config["prior"] == "laplace" else T
    assert sd["prior.scale"].item() == pytest.approx(expected, rel=1e-7)
    assert sd["prior.scale"].shape == ()


def test_mismatched_config_is_a_clear_error(fixture_data):
    config = dict(fixture_data["config"], nlayers=[2, 2, 2])
    with pytest.raises(ValueError, match="missing keys.*layers.4.s_layers.1"):
        rf.from_original(fixture_data["state_dict"], config)
    config = dict(fixture_data["config"], nhidden=16)
    with pytest.raises(ValueError, match="shapes do not match"):
        rf.from_original(fixture_data["state_dict"], config)
    with pytest.raises(ValueError, match="lacks"):
        rf.from_original(fixture_data["state_dict"], {"L": 16})
    bad = dict(fixture_data["state_dict"])
    bad["layers.0.mask_left"] = 1 - bad["layers.0.mask_left"]
    with pytest.raises(ValueError, match="checkerboard"):
        rf.from_original(bad, fixture_data["config"])


def test_mixed_temperature_cannot_be_saved_in_original_format():
    model = rf.RGFlow(8, 1, kernel_size=4, n_layers=1, hidden=4, temperature=[1.0, 0.5])
    with pytest.raises(ValueError, match="one temperature for all levels"):
        rf.to_original(model)
