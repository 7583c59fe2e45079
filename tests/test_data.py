"""Datasets: the MSDS generators (shapes, ranges, determinism, defining statistics), the
cache, image folders and the errors for unknown or missing data."""
import numpy as np
import pytest
import torch

from rgflow_fast import data


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RGFLOW_FAST_CACHE", str(tmp_path / "cache"))


def _cells(images):
    """Per 8×8 cell of uint8 images (N, 3, 32, 32): the orientation in radians (mod π) from
    the second moments of the brightness, the colour of the brightest pixel, and whether
    the ellipse is bright enough for the orientation to be measured."""
    x = images.astype(np.float64)
    n = x.shape[0]
    cells = x.reshape(n, 3, 4, 8, 4, 8).transpose(0, 2, 4, 1, 3, 5).reshape(n, 16, 3, 8, 8)
    w = cells.sum(axis=2)  # brightness (n, 16, 8, 8)
    flat = w.reshape(n, 16, 64)
    brightest = flat.argmax(axis=2)
    colour = np.take_along_axis(cells.reshape(n, 16, 3, 64), brightest[:, :, None, None], axis=3)[..., 0]
    peak = flat.max(axis=2)
    w = w / np.maximum(peak, 1)[..., None, None]
    r = np.arange(8) + 0.5
    yy, xx = np.meshgrid(r, r, indexing="ij")
    m = w.sum(axis=(2, 3))
    cy, cx = (w * yy).sum(axis=(2, 3)) / m, (w * xx).sum(axis=(2, 3)) / m
    dy, dx = yy - cy[..., None, None], xx - cx[..., None, None]
    mu20, mu02, mu11 = (w * dx * dx).sum(axis=(2, 3)), (w * dy * dy).sum(axis=(2, 3)), (w * dx * dy).sum(axis=(2, 3))
    angle = 0.5 * np.arctan2(2 * mu11, mu20 - mu02)
    return angle, colour, peak > 90


def _orientation_concentration(angle, valid):
    """|mean e^{2iθ}| over each image's measurable cells: 1 for one orientation, ~0.25 for 16 random."""
    z = np.where(valid, np.exp(2j * angle), 0)
    return np.abs(z.sum(axis=1)) / np.maximum(valid.sum(axis=1), 1)


@pytest.mark.parametrize("kind", ["msds1", "msds2"])
def test_msds_shape_range_and_background(kind, seed):
    images = data.msds(kind, "train", size=300, seed=seed)
    assert images.shape == (300, 3, 32, 32) and images.dtype == np.uint8
    assert images.max() > 200  # saturated ellipse cores of bright colours
    # 16 ellipses of area π·3.5·1.5 ≈ 16.5 px² cover about a quarter of the image: the rest is black
    background = (images.max(axis=1) == 0).mean()
    assert 0.45 < background < 0.75, background


@pytest.mark.parametrize("kind", ["msds1", "msds2"])
def test_msds_is_deterministic_and_prefix_stable(kind, seed):
    assert data.CHUNK < 300  # so that the sizes below cross chunk boundaries
    a = data.msds(kind, "train", size=600, seed=seed)
    np.testing.assert_array_equal(a, data.msds(kind, "train", size=600, seed=seed))
    np.testing.assert_array_equal(a[:300], data.msds(kind, "train", size=300, seed=seed))
    assert not np.array_equal(a[:50], data.msds(kind, "train", size=50, seed=seed + 1))
    assert not np.array_equal(a[:50], data.msds(kind, "test", size=50, seed=seed))
    other = "msds2" if kind == "msds1" else "msds1"
    assert not np.array_equal(a[:50], data.msds(other, "train", size=50, seed=seed))


def test_msds1_one_colour_per_image_many_orientations(seed):
    angle, colour, valid = _cells(data.msds("msds1", "train", size=400, seed=seed))
    # the 16 ellipses' colours stay within ±32 of the image's colour (std of U{-32..32} ≈ 18.8)
    within = colour.std(axis=1).mean()
    assert within < 25, within
    # ... while the image colour itself varies between images (std of U{32..223} ≈ 55)
    between = colour.mean(axis=1).std(axis=0).mean()
    assert between > 40, between
    # orientations are independent: far from concentrated within an image
    concentration = _orientation_concentration(angle, valid).mean()
    assert concentration < 0.45, concentration


def test_msds2_one_orientation_per_image_many_colours(seed):
    angle, colour, valid = _cells(data.msds("msds2", "train", size=400, seed=seed))
    within = colour.std(axis=1).mean()  # independent U{0..255} per ellipse: std ≈ 74
    assert within > 55, within
    concentration = _orientation_concentration(angle, valid)
    assert concentration.mean() > 0.9, concentration.mean()
    # the shared orientation differs between images
    image_angle = 0.5 * np.angle(np.where(valid, np.exp(2j * angle), 0).sum(axis=1))
    assert np.abs(np.exp(2j * image_angle).mean()) < 0.3


def test_load_dataset_caches_msds(tmp_path, seed):
    first = data.load_dataset("msds2", "test", size=120, seed=seed)
    assert isinstance(first, data.UInt8Images) and len(first) == 120
    cached = list((tmp_path / "cache").glob("*.npy"))
    assert [p.name for p in cached] == [f"msds2-seed{seed}-test-120.npy"]
    np.testing.assert_array_equal(np.load(cached[0]), data.msds("msds2", "test", size=120, seed=seed))
    cached[0].write_bytes(b"not an array")  # a damaged cache file is regenerated
    again = data.load_dataset("msds2", "test", size=120, seed=seed)
    assert torch.equal(again.images, first.images)
    assert again.batch([3, 0]).shape == (2, 3, 32, 32)


def test_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):  # non-square and greyscale images are cropped, resized and made RGB
        mode, shape = ("L", (30, 20)) if i % 2 else ("RGB", (17, 25, 3))
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(root / "a" / f"{i}.png")
    train = data.load_dataset("folder", "train", root, image_size=8)
    test = data.load_dataset("folder", "test", root, image_size=8)
    assert (len(train), len(test)) == (38, 2)
    assert train[0].shape == (3, 8, 8) and train[0].dtype == torch.uint8


def test_unknown_dataset():
    with pytest.raises(data.DataError, match="unknown dataset 'imagenet'; choose one of msds1, msds2"):
        data.load_dataset("imagenet")


def test_missing_data_dir(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_dataset("cifar10", "train", tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="pass --data-dir"):
        data.load_dataset("cifar10", "train", None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("mnist32", "MNIST/raw"),
        ("celeba32", "celeba/img_align_celeba"),
        ("folder", "class sub-folders"),
    ],
)
def test_missing_files_say_what_to_put_where(tmp_path, name, expected):
    pytest.importorskip("torchvision")
    with pytest.raises(data.DataError, match="never downloads") as info:
        data.load_dataset(name, "train", tmp_path)
    assert expected in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded or created


def test_bad_sizes():
    with pytest.raises(data.DataError, match="has 10000 test images"):
        data.load_dataset("msds1", "test", size=10_001)
    with pytest.raises(data.DataError, match="32×32 images"):
        data.load_dataset("cifar10", image_size=64)


def test_celeba_crop_is_centre_148_then_bicubic_32():
    from PIL import Image

    rng = np.random.default_rng(0)
    face = Image.fromarray(rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8))  # CelebA's size
    left, top = (178 - 148) // 2, (218 - 148) // 2
    expected = face.crop((left, top, left + 148, top + 148)).resize((32, 32), Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(data._square(32, crop=148)(face)), np.asarray(expected))
