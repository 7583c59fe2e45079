import math

import pytest
import torch

from rgflow_fast.geometry import latent_levels
from rgflow_fast.priors import Prior


def float64_prior(kind, channels, L, k, temperature):
    prior = Prior(kind, channels, L, k).double()
    prior.set_temperature(temperature)  # set in float64, not rounded through float32
    return prior


def make_dist(kind, T):
    zero, T = torch.tensor(0.0, dtype=torch.float64), torch.tensor(T, dtype=torch.float64)
    if kind == "laplace":
        return torch.distributions.Laplace(zero, T / math.sqrt(2))
    return torch.distributions.Normal(zero, T)


@pytest.mark.parametrize("T", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_log_prob_matches_torch_distributions(seed, kind, T):
    prior = float64_prior(kind, 2, 8, 4, T)
    z = torch.randn(3, 2, 8, 8, dtype=torch.float64) * 2
    dist = make_dist(kind, T)
    expected = dist.log_prob(z).reshape(3, -1).sum(1)
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-12, atol=1e-12)
    assert prior.temperature == pytest.approx([T, T])


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_mixed_temperature_uses_each_pixels_level(seed, kind):
    L, k = 16, 2  # 4 levels
    temps = [0.5, 1.0, 1.5, 2.0]
    prior = float64_prior(kind, 1, L, k, temps)
    z = torch.randn(2, 1, L, L, dtype=torch.float64)
    levels = latent_levels(L, k)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(L):
        for j in range(L):
            T = temps[max(h for h in range(4) if i % 2**h == 0 and j % 2**h == 0)]
            assert T == temps[levels[i, j]]
            total += make_dist(kind, T).log_prob(z[:, 0, i, j])
    torch.testing.assert_close(prior.log_prob(z), total, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_samples_have_the_prior_statistics(seed, kind):
    temps = [0.5, 2.0]
    prior = float64_prior(kind, 1, 8, 4, temps)
    z = prior.sample(4000)
    levels = latent_levels(8, 4)
    for h, T in enumerate(temps):
        values = z[:, 0][:, levels == h].flatten()
        # unit variance at T = 1 for both priors; std of the sample std is ~ std/sqrt(2n)
        assert values.std().item() == pytest.approx(T, rel=0.05)
        assert values.mean().abs().item() < 5 * T / math.sqrt(values.numel())
    top = z[:, 0][:, levels == 0].flatten()
    kurtosis = (((top - top.mean()) ** 4).mean() / top.var() ** 2).item()
    assert kurtosis == pytest.approx(6.0 if kind == "laplace" else 3.0, rel=0.15)


def test_set_temperature_and_per_call_temperature(seed):
    prior = Prior("laplace", 1, 8, 4)
    z = torch.randn(2, 1, 8, 8)
    at_half = prior.log_prob(z, temperature=0.5)
    prior.set_temperature(0.5)
    torch.testing.assert_close(prior.log_prob(z), at_half)
    with pytest.raises(ValueError, match="one value per RG level"):
        prior.set_temperature([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 1, 8, 8\)"):
        prior.log_prob(torch.zeros(2, 2, 8, 8))
