import math

import pytest
import torch

from rgflow_fast.transforms import (
    bits_per_dim,
    dequantize,
    inverse_logit_transform,
    logit_transform,
    preprocess,
    to_pixels,
)


def test_logit_round_trip(seed):
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    y, _ = logit_transform(x)
    torch.testing.assert_close(inverse_logit_transform(y), x, rtol=1e-12, atol=1e-12)


def test_logit_logdet_matches_autograd(seed):
    x = torch.rand(2, 1, 3, 3, dtype=torch.float64)
    _, ldj = logit_transform(x)
    for b in range(2):
        grad = torch.autograd.functional.jacobian(lambda v: logit_transform(v)[0], x[b : b + 1])
        diag = grad.reshape(9, 9).diagonal()
        torch.testing.assert_close(ldj[b], diag.log().sum(), rtol=1e-12, atol=1e-12)


def test_logit_values_by_hand():
    x = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    y, ldj = logit_transform(x)
    torch.testing.assert_close(y.flatten(), torch.tensor([math.log(0.05 / 0.95), 0.0, math.log(0.95 / 0.05)], dtype=torch.float64))
    # dy/dx = 0.9 / (x'(1-x')) with x' = 0.05, 0.5, 0.95
    by_hand = 2 * math.log(0.9 / (0.05 * 0.95)) + math.log(0.9 / 0.25)
    assert ldj.item() == pytest.approx(by_hand, rel=1e-12)


def test_dequantize_stays_in_its_bin(seed):
    x = torch.randint(0, 256, (4, 3, 8, 8)).double() / 255
    d = dequantize(x)
    assert torch.equal(torch.floor(d * 256), torch.round(x * 255))
    g = torch.Generator().manual_seed(0)
    a = preprocess(x, generator=g)[0]
    g.manual_seed(0)
    assert torch.equal(a, preprocess(x, generator=g)[0])


def test_bits_per_dim_by_hand():
    # a uniform density on [0,1]^D has log-likelihood 0: bpd = 8 exactly
    assert bits_per_dim(torch.tensor([0.0]), torch.tensor([0.0]), 12).item() == pytest.approx(8.0)
    # log_prob + ldj = -D*log(2) nats -> one more bit per dim
    D = 3 * 4 * 4
    lp = torch.tensor([-D * math.log(2) - 5.0], dtype=torch.float64)
    assert bits_per_dim(lp, torch.tensor([5.0], dtype=torch.float64), D).item() == pytest.approx(9.0, rel=1e-12)


def test_to_pixels_is_clamped_inverse():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(to_pixels(logit_transform(x)[0]), x, rtol=1e-12, atol=1e-12)
    far = torch.tensor([-30.0, -3.0, 0.0, 3.0, 30.0])  # beyond the data's logit range on both sides
    pixels = to_pixels(far)
    assert pixels.min() == 0 and pixels.max() == 1 and pixels[2] == 0.5


def test_empty_batch():
    y, ldj = logit_transform(torch.rand(0, 3, 4, 4))
    assert y.shape == (0, 3, 4, 4) and ldj.shape == (0,)
