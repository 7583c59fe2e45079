"""The paper's analysis tools: causal cones against perturbations of randomised models,
receptive fields against finite differences, hyperbolic mixing, latent walks, inpainting on
a trained toy model (the CLI subcommands: tests/test_commands.py)."""
import math

import pytest
import torch

import rgflow_fast as rf
from conftest import randomize_
from rgflow_fast import geometry
from rgflow_fast.analysis import (
    latent_correlation,
    pick_latents,
    walk_values,
    _disjoint_groups,
    causal_cone,
    generation_cone,
    inference_cone,
    inpaint,
    latent_levels,
    mix,
    receptive_field,
    receptive_field_strengths,
    receptive_fields,
    strength_statistics,
    walk,
)
from rgflow_fast.transforms import inverse_logit_transform, logit_transform


pytestmark = pytest.mark.usefixtures("reference_one_thread")


def small_model(L=8, C=2, k=4, dtype=torch.float64, **kw):
    kw = {"n_layers": 2, "n_res_blocks": 1, "n_mlp": 1, "hidden": 8, **kw}
    return randomize_(rf.RGFlow(L, C, kernel_size=k, **kw).to(dtype))


def one_latent_per_level(L, k):
    """A random position (i, j) of every RG level."""
    levels = latent_levels(L, k)
    picks = []
    for h in range(int(levels.max()) + 1):
        positions = (levels == h).nonzero()
        picks.append(tuple(int(v) for v in positions[torch.randint(len(positions), ())]))
    return picks


def changed_positions(a, b):
    """(L, L) bool: positions where any batch element or channel of a and b differ.

    Positions outside a cone go through bit-identical arithmetic in both runs, so they do
    not differ at all; the threshold only guards against a BLAS that is not bitwise
    reproducible, and is far below the O(1e-3..1) changes inside the cone."""
    return (a - b).abs().amax(dim=(0, 1)) > 1e-12


def test_latent_levels_is_the_geometry_function():
    assert rf.analysis.latent_levels is geometry.latent_levels


# The cones are exact for a generic model: a change of one patch element reaches every element
# of the patch through a stack of >= 2 coupling layers (n_layers=2 here), and the dense random
# MLPs make every such dependence nonzero except on a measure-zero set of parameters and inputs,
# which random draws with a generic perturbation do not hit. So the changed set equals the cone.
@pytest.mark.parametrize("L,k,C", [(8, 4, 2), (16, 4, 1), (16, 2, 2), (8, 2, 3)])
def test_generation_cone_is_exactly_what_a_latent_changes(seed, L, k, C):
    model = small_model(L, C, k)
    z = torch.randn(2, C, L, L, dtype=torch.float64)
    x = model.inverse(z)[0]
    for i, j in one_latent_per_level(L, k):
        c = int(torch.randint(C, ()))
        z2 = z.clone()
        z2[:, c, i, j] += 0.5 + torch.rand(())
        cone = generation_cone(L, k, i, j)
        assert torch.equal(changed_positions(model.inverse(z2)[0], x), cone), (i, j)


@pytest.mark.parametrize("L,k,C", [(8, 4, 2), (16, 4, 1), (16, 2, 2), (8, 2, 3)])
def test_inference_cone_is_exactly_what_a_pixel_changes(seed, L, k, C):
    model = small_model(L, C, k)
    x = torch.randn(2, C, L, L, dtype=torch.float64)
    z = model(x)[0]
    for _ in range(3):
        i, j = (int(v) for v in torch.randint(L, (2,)))
        c = int(torch.randint(C, ()))
        x2 = x.clone()
        x2[:, c, i, j] += 0.5 + torch.rand(())
        assert torch.equal(changed_positions(model(x2)[0], z), inference_cone(L, k, i, j)), (i, j)


def test_single_layer_cones_are_upper_bounds(seed):
    # One coupling layer does not mix a whole patch, so fewer positions may change; none outside.
    L, k, C = 16, 4, 2
    model = small_model(L, C, k, n_layers=1)
    z = torch.randn(2, C, L, L, dtype=torch.float64)
    for i, j in one_latent_per_level(L, k):
        z2 = z.clone()
        z2[:, 0, i, j] += 1.0
        changed = changed_positions(model.inverse(z2)[0], model.inverse(z)[0])
        assert changed[i, j] and not (changed & ~generation_cone(L, k, i, j)).any()


def test_cone_of_a_region_is_the_union_and_batches(seed):
    L, k = 32, 4
    masks = torch.rand(3, L, L) < 0.01
    masks[:, 0, 0] = True
    for direction, point_cone in (("inference", inference_cone), ("generation", generation_cone)):
        cones = causal_cone(masks, k, direction)
        for mask, cone in zip(masks, cones):
            union = torch.zeros(L, L, dtype=torch.bool)
            for i, j in mask.nonzero().tolist():
                union |= point_cone(L, k, i, j)
            assert torch.equal(cone, union)


@pytest.mark.parametrize("k", [2, 4])
def test_inference_cone_holds_O1_latents_per_level(seed, k):
    # After level h's two blocks the cone of one pixel lies in a box of at most 4k x 4k
    # level-h lattice steps: a pixel's patch is k wide, the half-shifted block makes it 2k;
    # at the next level that is k steps, which the aligned patches of side k widen to at most
    # 3k and the shifted ones to 4k; halving 4k gives 2k, which again grows to at most 4k. A
    # quarter of the box belongs to higher levels, so each level holds at most 12k² latents of
    # the cone, whatever L: O(log L) in all.
    for n in range(2, 10):
        L = k * 2 ** (n - 1)
        pixels = torch.zeros(8, L, L, dtype=torch.bool)
        pixels[torch.arange(8), torch.randint(L, (8,)), torch.randint(L, (8,))] = True
        cones = causal_cone(pixels, k, "inference")
        levels = latent_levels(L, k)
        per_level = torch.stack([(cones & (levels == h)).flatten(1).sum(dim=1) for h in range(n)], dim=1)
        assert torch.equal(per_level.sum(dim=1), cones.flatten(1).sum(dim=1))
        assert per_level.max() <= 12 * k * k, (L, per_level)
        assert (per_level[:, 0] == (2 * k) ** 2 - k * k).all()  # level 0: the 2k x 2k box, less level >= 1
    assert cones.flatten(1).sum(dim=1).max() <= 12 * k * k * n < L * L // 100  # vs all L² latents
    # L = 1024 (k = 4): the generation cone of a level-0 latent stays within 2k x 2k pixels
    # and the top latent's covers the image.
    assert generation_cone(1024, 4, 513, 7).sum() <= (2 * 4) ** 2
    assert generation_cone(1024, 4, 0, 0).all()


def test_cone_bad_inputs():
    with pytest.raises(ValueError, match="i must be an int in"):
        inference_cone(16, 4, 16, 0)
    with pytest.raises(ValueError, match="image_size"):
        generation_cone(12, 4, 0, 0)
    with pytest.raises(ValueError, match="direction"):
        causal_cone(torch.zeros(8, 8, dtype=torch.bool), 4, "sideways")
    with pytest.raises(TypeError, match="bool tensor"):
        causal_cone(torch.zeros(8, 8), 4, "inference")


def test_receptive_fields_match_finite_differences(seed):
    L, C, k = 8, 2, 2
    model = small_model(L, C, k)
    z = model.prior.sample(5)
    latents = [(int(torch.randint(C, ())), i, j) for i, j in one_latent_per_level(L, k)]
    fields = receptive_fields(model, latents, z=z, batch_size=3)
    eps = 1e-6
    for field, (c, i, j) in zip(fields, latents):
        step = torch.zeros_like(z)
        step[:, c, i, j] = eps
        expected = ((model.inverse(z + step)[0] - model.inverse(z - step)[0]) / (2 * eps)).mean(dim=0)
        torch.testing.assert_close(field, expected, rtol=1e-6, atol=1e-6)
        assert not (field.abs().amax(dim=0) > 0)[~generation_cone(L, k, i, j)].any()
    one = receptive_field(model, latents[0][1], latents[0][2], latents[0][0], z=z)
    torch.testing.assert_close(one, fields[0], rtol=1e-12, atol=1e-12)


def test_receptive_field_of_a_fresh_model_is_a_unit_pixel(seed):
    # A fresh flow is the identity: ∂G/∂z_l is the one-hot at l for every z.
    model = rf.RGFlow(8, 3, kernel_size=4, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=4).double()
    field = receptive_field(model, 5, 2, channel=1, n_samples=3)
    expected = torch.zeros(3, 8, 8, dtype=torch.float64)
    expected[1, 5, 2] = 1
    assert torch.equal(field, expected)


def test_strengths_of_all_latents_match_one_by_one(seed):
    # Latents with disjoint generation cones share one product; the shared results must
    # separate into exactly the individual receptive fields' strengths.
    L, C, k = 16, 2, 4
    model = small_model(L, C, k)
    z = model.prior.sample(2)
    strengths = receptive_field_strengths(model, z=z, batch_size=512)
    latents = [(c, i, j) for c in range(C) for i in range(L) for j in range(L)]
    fields = receptive_fields(model, latents, z=z, batch_size=512)
    torch.testing.assert_close(strengths, fields.flatten(1).norm(dim=1).view(C, L, L), rtol=1e-10, atol=1e-12)


def test_disjoint_groups_partition_positions_into_disjoint_cones():
    L, k = 16, 4
    eye = torch.eye(L * L, dtype=torch.bool).view(L * L, L, L)
    cones = causal_cone(eye, k, "generation")
    groups = _disjoint_groups(cones, torch.randperm(L * L))
    assert sorted(p for g in groups for p in g) == list(range(L * L))
    for g in groups:
        assert int(cones[g].sum()) == int(cones[g].any(dim=0).sum())  # pairwise disjoint
    assert len(groups) < L * L // 2


def test_strength_statistics_per_level():
    L, k, C = 16, 4, 2  # levels 0, 1, 2 with 192, 48, 16 positions
    levels = latent_levels(L, k)
    strengths = (0.5 * 4.0**levels).double().expand(C, L, L).clone()  # 0.5, 2, 8
    strengths[0, 0, 0] = 100.0  # the one level-2 outlier
    stats = strength_statistics(strengths, k, threshold=1.0, bins=10)
    assert [s["count"] for s in stats] == [C * 192, C * 48, C * 16]
    assert [s["above_threshold"] for s in stats] == [0, C * 48, C * 16]
    assert [s["median"] for s in stats] == [0.5, 2.0, 8.0]
    assert stats[2]["max"] == 100.0 and stats[2]["mean"] == pytest.approx((31 * 8 + 100) / 32)
    assert [sum(s["histogram"]) for s in stats] == [s["count"] for s in stats]
    assert stats[0]["log10_bin_edges"][0] == pytest.approx(math.log10(0.5))
    assert stats[0]["log10_bin_edges"][-1] == pytest.approx(2.0)


def test_receptive_field_bad_inputs():
    model = small_model()
    with pytest.raises(ValueError, match="channel, i, j"):
        receptive_fields(model, [(2, 0, 0)])
    with pytest.raises(ValueError, match="n_samples"):
        receptive_field(model, 0, 0, n_samples=0)
    with pytest.raises(ValueError, match="batch_size"):
        receptive_field(model, 0, 0, batch_size=0)


def test_mixing_takes_levels_from_a_and_b(seed):
    L, C, k = 16, 2, 4
    model = small_model(L, C, k)
    x_a, x_b = torch.randn(2, 3, C, L, L, dtype=torch.float64)
    z_a, z_b = model(x_a)[0], model(x_b)[0]
    assert torch.equal(mix(model, x_a, x_b, 0), model.inverse(z_a)[0])  # λ = 0: all from A
    assert torch.equal(mix(model, x_a, x_b, model.n_levels), model.inverse(z_b)[0])  # all from B
    torch.testing.assert_close(mix(model, x_a, x_b, 0), x_a, rtol=1e-10, atol=1e-10)
    levels = latent_levels(L, k)
    for lam in range(1, model.n_levels):
        z = model(mix(model, x_a, x_b, lam))[0]
        torch.testing.assert_close(z, torch.where(levels >= lam, z_a, z_b), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="lam must be an int in"):
        mix(model, x_a, x_b, model.n_levels + 1)
    with pytest.raises(ValueError, match="same shape"):
        mix(model, x_a, x_b[:1], 1)


def test_walk_sets_one_latent_and_changes_only_its_cone(seed):
    L, C, k = 16, 2, 4
    model = small_model(L, C, k)
    x = torch.randn(C, L, L, dtype=torch.float64)
    values = torch.tensor([-1.0, 0.0, 0.7, 1.5])
    i, j = one_latent_per_level(L, k)[1]
    frames = walk(model, x, i, j, 1, values)
    assert frames.shape == (4, C, L, L)
    z = model(frames)[0]
    expected = model(x[None])[0].repeat(4, 1, 1, 1)
    expected[:, 1, i, j] = values.double()
    torch.testing.assert_close(z, expected, rtol=1e-10, atol=1e-10)
    outside = ~generation_cone(L, k, i, j)
    torch.testing.assert_close(frames[..., outside], x[None].expand_as(frames)[..., outside], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one image"):
        walk(model, x[None], i, j, 0, values)


def test_walk_defaults_sweep_four_prior_standard_deviations(seed):
    L, C, k = 16, 2, 4  # levels 0, 1, 2
    model = small_model(L, C, k, temperature=[1.0, 0.5, 2.0])
    x = torch.randn(C, L, L, dtype=torch.float64)
    levels = latent_levels(L, k)
    for h, (i, j) in enumerate(one_latent_per_level(L, k)):
        assert levels[i, j] == h
        sigma = [1.0, 0.5, 2.0][h]
        values = walk_values(model, i, j)
        assert values.shape == (7,) and values.dtype == torch.float64
        torch.testing.assert_close(values, torch.linspace(-4 * sigma, 4 * sigma, 7, dtype=torch.float64))
        assert values[3] == 0  # the prior's mode in the middle frame
        torch.testing.assert_close(walk_values(model, i, j, n_frames=3, spread=1.0, temperature=3.0),
                                   torch.tensor([-3.0, 0.0, 3.0], dtype=torch.float64))
        c = int(torch.randint(C, ()))
        frames = walk(model, x, i, j, c)
        assert torch.equal(frames, walk(model, x, i, j, c, values))
        z = model(frames)[0]
        torch.testing.assert_close(z[:, c, i, j], values, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="n_frames"):
        walk_values(model, 0, 0, n_frames=1)
    with pytest.raises(ValueError, match="spread"):
        walk_values(model, 0, 0, spread=0.0)


def test_pick_latents_is_seeded_and_covers_every_level():
    L, C, k = 32, 3, 4  # levels 0..3 with 768, 192, 48, 16 positions
    model = small_model(L, C, k)
    state = torch.get_rng_state()
    picks = pick_latents(model, per_level=20)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    assert picks == pick_latents(model, per_level=20, seed=0)
    assert picks != pick_latents(model, per_level=20, seed=1)
    levels = latent_levels(L, k)
    got = [int(levels[i, j]) for _, i, j in picks]
    assert got == sorted(got)
    assert [got.count(h) for h in range(4)] == [20, 20, 20, 16]  # all 16 of the top level
    for h in range(4):
        positions = [(i, j) for (_, i, j), g in zip(picks, got) if g == h]
        assert positions == sorted(set(positions))  # distinct, row-major
    assert all(0 <= c < C for c, _, _ in picks)
    assert len({c for c, _, _ in picks}) == C
    with pytest.raises(ValueError, match="per_level"):
        pick_latents(model, per_level=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_latent_correlation_is_the_correlation_of_one_level_s_latents(seed, dtype):
    L, C, k = 16, 2, 4
    model = small_model(L, C, k, dtype=dtype)
    x = 1.5 * torch.randn(300, C, L, L, dtype=dtype)
    x[:, 1] += 0.8 * x[:, 0]  # correlated channels, so that some latents correlate
    z = model(x)[0].double()
    levels = latent_levels(L, k)
    for level in range(model.n_levels):
        result = latent_correlation(model, x, level, batch_size=64)
        where = levels == level
        expected = torch.corrcoef(z[:, :, where].flatten(1).T)
        D = C * int(where.sum())
        assert result.matrix.shape == (D, D) and result.matrix.dtype == torch.float64
        assert result.level == level and result.count == 300
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(result.matrix, expected, rtol=tol, atol=tol)
        assert torch.equal(result.matrix, result.matrix.T)
        assert (result.matrix.diagonal() == 1).all()
        # latents[a] names row a: channel-major, then i, then j
        rows = torch.tensor([[c, i, j] for c, i, j in result.latents])
        assert torch.equal(rows, torch.tensor([[c, i, j] for c in range(C) for i, j in where.nonzero().tolist()]))
        assert (levels[rows[:, 1], rows[:, 2]] == level).all()
    assert (latent_correlation(model, x, 0).matrix - torch.eye(C * 192)).abs().max() > 0.3
    # the authors' z[:, :, ::2**h, ::2**h]: levels >= h
    above = latent_correlation(model, x, 1, and_above=True)
    torch.testing.assert_close(above.matrix, torch.corrcoef(z[:, :, ::2, ::2].flatten(1).T), rtol=1e-5, atol=1e-5)


def test_latent_correlation_streams_batches_and_takes_latents(seed):
    L, C, k = 8, 2, 4
    model = small_model(L, C, k)
    x = torch.randn(50, C, L, L, dtype=torch.float64) + 3.0  # far from zero mean: the update must centre
    whole = latent_correlation(model, x, 0)
    loader = [(batch, torch.zeros(len(batch))) for batch in x.split([7, 1, 30, 12])]
    torch.testing.assert_close(latent_correlation(model, loader, 0).matrix, whole.matrix, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(latent_correlation(model, x, 0, batch_size=3).matrix, whole.matrix, rtol=1e-12, atol=1e-12)
    z = model(x)[0]
    torch.testing.assert_close(latent_correlation(model, z, 0, are_latents=True).matrix, whole.matrix,
                               rtol=1e-12, atol=1e-12)


def test_latent_correlation_recovers_a_planted_correlation(seed):
    L, C, k = 8, 1, 2  # top level (2): positions (0, 0), (0, 4), (4, 0), (4, 4)
    model = small_model(L, C, k)
    z = model.prior.sample(20000)
    rho = 0.6
    z[:, 0, 4, 4] = rho * z[:, 0, 0, 4] + (1 - rho**2) ** 0.5 * z[:, 0, 4, 4]
    z[:, 0, 4, 0] = 0.5  # a constant latent has no correlation
    result = latent_correlation(model, z, 2, are_latents=True)
    assert result.latents == [(0, 0, 0), (0, 0, 4), (0, 4, 0), (0, 4, 4)]
    m = result.matrix
    assert m[1, 3] == pytest.approx(rho, abs=0.03) and m[3, 1] == m[1, 3]  # 0.03 ≈ 4 standard errors
    assert abs(m[0, 1]) < 0.03 and abs(m[0, 3]) < 0.03
    assert m[2].isnan().all() and m[:, 2].isnan().all()
    assert m[0, 0] == m[1, 1] == m[3, 3] == 1


def test_latent_correlation_bad_inputs():
    model = small_model()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="level must be an int in"):
        latent_correlation(model, x, model.n_levels)
    with pytest.raises(ValueError, match="at least 2 images"):
        latent_correlation(model, x[:1], 0)
    with pytest.raises(ValueError, match="must have shape"):
        latent_correlation(model, x[:, :1], 0)
    with pytest.raises(TypeError, match="iterable"):
        latent_correlation(model, 3.0, 0)


def test_inpainting_varies_only_the_cone_and_keeps_the_rest(seed):
    L, C, k = 32, 2, 4
    model = small_model(L, C, k)
    x = torch.randn(2, C, L, L, dtype=torch.float64)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[9:12, 20:22] = True
    image, n_varied = inpaint(model, x, mask, n_starts=3, steps=2)
    cone = causal_cone(mask, k, "inference")
    assert n_varied == C * int(cone.sum()) < C * L * L // 2
    assert torch.equal(image[..., ~mask], x[..., ~mask])
    assert not torch.equal(image[..., mask], x[..., mask])
    # Latents outside the region's inference cone do not depend on its pixels.
    torch.testing.assert_close(model(image)[0][..., ~cone], model(x)[0][..., ~cone], rtol=1e-10, atol=1e-10)
    assert inpaint(model, x, mask, n_starts=0, steps=1, restrict_to_cone=False)[1] == C * L * L
    with pytest.raises(ValueError, match="mask must be"):
        inpaint(model, x, mask[:8])
    with pytest.raises(ValueError, match="mask is empty"):
        inpaint(model, x, torch.zeros(L, L, dtype=torch.bool))


def blobs(n, L):
    """Smooth images in [0, 1]: one Gaussian blob of random centre and width per image."""
    ij = torch.arange(L, dtype=torch.float32)
    centre = torch.rand(n, 2) * (L - 1)
    width = 1.5 + 1.5 * torch.rand(n, 1, 1)
    d2 = (ij[None, :, None] - centre[:, 0, None, None]) ** 2 + (ij[None, None, :] - centre[:, 1, None, None]) ** 2
    return (0.1 + 0.8 * torch.exp(-d2 / (2 * width**2)))[:, None]


@pytest.mark.slow
def test_inpainting_restores_a_trained_toy_model_s_images(seed):
    L = 8
    model = rf.RGFlow(L, 1, kernel_size=4, n_layers=2, n_res_blocks=1, n_mlp=1, hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = -model.log_prob(logit_transform(blobs(64, L))[0]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.requires_grad_(False)
    truth = blobs(8, L)
    x = logit_transform(truth)[0]
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[3:5, 2:5] = True
    image, _ = inpaint(model, x, mask, n_starts=32, steps=100)
    assert torch.equal(image[..., ~mask], x[..., ~mask])

    def error(y):
        return ((inverse_logit_transform(y) - truth)[..., mask] ** 2).mean(dim=(1, 2))

    noise_error = error(torch.where(mask, torch.randn_like(x), x))
    # Typical errors: ~0.1 for the noise fill, ~1e-4 inpainted; an occasional image ends in a
    # poor local optimum, so compare medians with a wide margin.
    assert error(image).median() < 0.1 * noise_error.median(), (error(image), noise_error)
