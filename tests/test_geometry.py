import pytest
import torch

from rgflow_fast.geometry import (
    block_specs,
    blocks_per_side,
    checkerboard,
    latent_levels,
    num_levels,
    num_patches,
    patch_indices,
)


@pytest.mark.parametrize("L,k,n", [(4, 4, 1), (8, 4, 2), (32, 4, 4), (16, 2, 4), (2, 2, 1), (64, 8, 4)])
def test_num_levels(L, k, n):
    assert num_levels(L, k) == n


@pytest.mark.parametrize("L,k", [(12, 4), (6, 4), (3, 2), (24, 4), (0, 4)])
def test_num_levels_rejects_bad_sizes(L, k):
    with pytest.raises(ValueError, match="image_size"):
        num_levels(L, k)


@pytest.mark.parametrize("k", [3, 1, 0, 5])
def test_odd_kernel_is_rejected(k):
    with pytest.raises(ValueError, match="kernel_size must be even"):
        num_levels(12, k)


def test_block_specs_order():
    specs = block_specs(32, 4)
    assert [(s.level, s.dilation, s.offset, s.blocks_per_side) for s in specs] == [
        (0, 1, 0, 8), (0, 1, 2, 8), (1, 2, 0, 4), (1, 2, 4, 4),
        (2, 4, 0, 2), (2, 4, 8, 2), (3, 8, 0, 1), (3, 8, 16, 1),
    ]
    for s in specs:
        assert s.blocks_per_side == blocks_per_side(32, 4, s.dilation)
        assert s.num_patches == num_patches(32, 4, s.dilation) == s.blocks_per_side**2


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("parity", [0, 1])
def test_checkerboard_masks_are_built_once_per_dtype_and_device(k, parity):
    like = torch.zeros(1, dtype=torch.float64)
    with torch.inference_mode():  # a mask first built here must still be usable by autograd
        mask = checkerboard(k, parity, like)
    a = torch.arange(k)
    assert torch.equal(mask, (((a[:, None] + a[None, :]) % 2) == 1 - parity).double())
    assert not mask.is_inference() and mask.dtype == torch.float64
    assert checkerboard(k, parity, like) is mask
    assert checkerboard(k, parity, like.float()).dtype == torch.float32
    assert torch.equal(checkerboard(k, 1 - parity, like), 1 - mask)


@pytest.mark.parametrize("L,k,d,off", [(8, 2, 1, 0), (8, 2, 2, 2), (16, 4, 2, 4), (16, 4, 4, 8), (12, 2, 3, 5)])
def test_patch_indices_formula_and_disjointness(L, k, d, off):
    rows, cols = patch_indices(L, k, d, off)
    m = L // (k * d)
    for pi in range(m):
        for pj in range(m):
            for a in range(k):
                for b in range(k):
                    p, e = pi * m + pj, a * k + b
                    assert rows[p, e] == (pi * k * d + a * d + off) % L
                    assert cols[p, e] == (pj * k * d + b * d + off) % L
    flat = rows * L + cols
    # patches never overlap and cover exactly the lattice (off + d*Z)^2 mod L
    assert flat.unique().numel() == flat.numel() == (L // d) ** 2
    assert bool(((rows - off) % d == 0).all() and ((cols - off) % d == 0).all())


def brute_force_level(i, j, n):
    return max(h for h in range(n) if i % 2**h == 0 and j % 2**h == 0)


@pytest.mark.parametrize("L,k", [(16, 4), (16, 2), (8, 8), (32, 4)])
def test_latent_levels(L, k):
    n = num_levels(L, k)
    levels = latent_levels(L, k)
    expected = torch.tensor([[brute_force_level(i, j, n) for j in range(L)] for i in range(L)])
    assert torch.equal(levels, expected)
