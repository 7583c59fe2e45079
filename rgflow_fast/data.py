"""Datasets for training and evaluating RG-Flow: the synthetic MSDS1/MSDS2 sets (generated
here, deterministically from a seed) and CIFAR-10, MNIST-32, CelebA-32 and image folders
(read from a local ``data_dir`` through torchvision; nothing is ever downloaded).

Every dataset yields ``uint8`` images ``(C, L, L)``; the trainer maps them to ``[0, 1]``
(``v/255``), dequantises and applies the logit transform (:mod:`rgflow_fast.transforms`).

MSDS ("multi-scale disentanglement set", from the RG-Flow paper): 32×32 RGB, black
background, 16 ellipses on a 4×4 grid of 8 px cells, each ellipse centred in its cell and
jittered by an integer offset in {-1, 0, 1} per axis, semi-axes 3.5 and 1.5 px, edges
anti-aliased over one pixel.

* MSDS1: one colour per image (each channel uniform on 32…223); each ellipse's colour is it
  plus an integer jitter uniform on -32…32 per channel; each ellipse has its own orientation,
  uniform on [0°, 180°).
* MSDS2: one orientation per image, uniform on [0°, 180°); each ellipse has its own colour,
  each channel uniform on 0…255. (The paper's own generator also turns each ellipse by up
  to 45° more; here all 16 share the orientation exactly, as the paper's text describes MSDS2.)

90 000 train and 10 000 test images. Image ``i`` of a split depends only on
``(seed, split, i // CHUNK)``, so a smaller ``size`` gives a prefix of the full set.
Generated arrays are cached under :func:`cache_dir` (written atomically).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write

__all__ = [
    "DATASETS",
    "GENERATED",
    "DatasetInfo",
    "DataError",
    "UInt8Images",
    "msds",
    "cache_dir",
    "load_dataset",
    "dataset_info",
    "require_torchvision",
]

CHUNK = 256  # images generated from one random stream (the unit of determinism)
MSDS_SIZES = {"train": 90_000, "test": 10_000}
_SPLIT_IDS = {"train": 0, "test": 1}
_GRID, _CELL, _SIDE = 4, 8, 32
_SEMI_AXES = (3.5, 1.5)


class DataError(ValueError):
    """A dataset cannot be loaded (unknown name, missing files); the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    image_size: int  # None: set by the caller (image folders)
    flip: bool  # random horizontal flips while training
    description: str


DATASETS = {
    "msds1": DatasetInfo("msds1", 3, 32, False, "synthetic MSDS1 (generated, no files needed)"),
    "msds2": DatasetInfo("msds2", 3, 32, False, "synthetic MSDS2 (generated, no files needed)"),
    "cifar10": DatasetInfo("cifar10", 3, 32, False, "CIFAR-10 from DATA_DIR/cifar-10-batches-py"),
    "mnist32": DatasetInfo("mnist32", 1, 32, False, "MNIST padded to 32×32 from DATA_DIR/MNIST/raw"),
    "celeba32": DatasetInfo(
        "celeba32", 3, 32, True, "CelebA, centre crop 148, bicubic resize to 32, from DATA_DIR/celeba"
    ),
    "folder": DatasetInfo("folder", 3, None, False, "any image folder, centre-cropped square and resized"),
}

# Datasets made here from a seed: they read no files, so a data_dir means nothing to them.
GENERATED = ("msds1", "msds2")


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``image_size`` only for ``"folder"``."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    info = DATASETS[name]
    if info.image_size is None:
        return DatasetInfo(name, info.channels, image_size or 32, info.flip, info.description)
    if image_size is not None and image_size != info.image_size:
        raise DataError(f"dataset {name} has {info.image_size}×{info.image_size} images; got image_size={image_size}")
    return info


# --------------------------------------------------------------------------------------- MSDS


def _ellipse_alpha(angle, dy, dx):
    """Coverage ``(n, 16, 10, 10)`` of each ellipse over its cell's 10×10 window (the cell
    plus one pixel on every side, so that a jittered ellipse still fits).

    ``angle (n, 16)`` radians, ``dy``, ``dx (n, 16)`` jitter. Coverage is
    ``clip(0.5 - d, 0, 1)`` with ``d ≈ (g - 1)/|∇g|`` the signed distance to the boundary
    of ``g(u, v) = (u/a)² + (v/b)² = 1`` in pixels: a one-pixel anti-aliased edge.
    """
    a, b = _SEMI_AXES
    # pixel centres of the window relative to the ellipse centre (cell centre = window 5.0)
    grid = torch.arange(10, dtype=torch.float32) + 0.5 - 5.0
    y = grid.view(1, 1, 10, 1) - dy[..., None, None]
    x = grid.view(1, 1, 1, 10) - dx[..., None, None]
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    u = x * cos - y * sin  # rotate counter-clockwise on screen (y points down)
    v = x * sin + y * cos
    g = (u / a) ** 2 + (v / b) ** 2
    grad = 2 * torch.sqrt((u / a**2) ** 2 + (v / b**2) ** 2)
    distance = (g - 1) / grad.clamp_min(1e-6)
    return (0.5 - distance).clamp(0, 1)


def _msds_chunk(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` MSDS images ``(n, 3, 32, 32)`` uint8 from ``rng``."""
    cells = _GRID * _GRID
    if kind == "msds1":
        base = rng.integers(32, 224, size=(n, 1, 3))
        colour = base + rng.integers(-32, 33, size=(n, cells, 3))
        angle = rng.uniform(0, math.pi, size=(n, cells))
    else:
        colour = rng.integers(0, 256, size=(n, cells, 3))
        angle = np.repeat(rng.uniform(0, math.pi, size=(n, 1)), cells, axis=1)
    jitter = rng.integers(-1, 2, size=(n, cells, 2))
    alpha = _ellipse_alpha(
        torch.from_numpy(angle).float(),
        torch.from_numpy(jitter[..., 0]).float(),
        torch.from_numpy(jitter[..., 1]).float(),
    )
    colour = torch.from_numpy(colour).float()
    # canvas padded by one pixel so every cell's 10×10 window is in range; cells composite
    # over each other in order (a jittered ellipse may overlap its neighbour's window edge)
    canvas = torch.zeros(n, 3, _SIDE + 2, _SIDE + 2)
    for c in range(cells):
        i, j = divmod(c, _GRID)
        window = canvas[:, :, i * _CELL : i * _CELL + 10, j * _CELL : j * _CELL + 10]
        a = alpha[:, c, None]
        window.mul_(1 - a).add_(a * colour[:, c, :, None, None])
    return canvas[:, :, 1:-1, 1:-1].round_().clamp_(0, 255).to(torch.uint8).numpy()


def msds(kind: str, split: str = "train", size: int | None = None, seed: int = 0) -> np.ndarray:
    """Generate MSDS images ``(size, 3, 32, 32)`` uint8 (no caching; see :func:`load_dataset`).

    ``kind`` is ``"msds1"`` or ``"msds2"``, ``split`` ``"train"`` (90 000) or ``"test"``
    (10 000); ``size`` defaults to the split's size. Deterministic in ``(seed, split)``.
    """
    if kind not in GENERATED:
        raise DataError(f"unknown MSDS kind {kind!r}; choose 'msds1' or 'msds2'")
    if split not in _SPLIT_IDS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    size = MSDS_SIZES[split] if size is None else size
    if not isinstance(size, int) or size < 0:
        raise DataError(f"size must be an int >= 0; got {size!r}")
    out = np.empty((size, 3, _SIDE, _SIDE), dtype=np.uint8)
    for start in range(0, size, CHUNK):
        n = min(CHUNK, size - start)
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], int(kind[-1]), start // CHUNK])
        out[start : start + n] = _msds_chunk(kind, CHUNK, rng)[:n]
    return out


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$RGFLOW_FAST_CACHE``, else
    ``$XDG_CACHE_HOME/rgflow_fast``, else ``~/.cache/rgflow_fast``."""
    if os.environ.get("RGFLOW_FAST_CACHE"):
        return Path(os.environ["RGFLOW_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rgflow_fast"


def _cached_msds(kind: str, split: str, size: int | None, seed: int) -> np.ndarray:
    size = MSDS_SIZES[split] if size is None else size
    path = cache_dir() / f"{kind}-seed{seed}-{split}-{size}.npy"
    if path.is_file():
        try:
            images = np.load(path)
            if images.shape == (size, 3, _SIDE, _SIDE) and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):
            pass  # unreadable cache file: regenerate and replace it
    images = msds(kind, split, size, seed)
    try:
        atomic_write(path, lambda f: np.save(f, images))
    except OSError:
        pass  # a read-only cache only costs regeneration next time
    return images


# ------------------------------------------------------------------------------ file datasets


class UInt8Images(torch.utils.data.Dataset):
    """Images held in memory, ``images (N, C, L, L)`` uint8; ``batch(indices)`` slices at once."""

    def __init__(self, images):
        self.images = torch.as_tensor(images)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]

    def batch(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


class _ImagesOnly(torch.utils.data.Dataset):
    """A torchvision dataset with its labels dropped; images as uint8 ``(C, L, L)``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0]


def _square(size: int, crop: int | None = None):
    """PIL image → ``size``×``size``: centre-crop ``crop`` px then bicubic resize (CelebA's
    148 px face crop), or, without ``crop``, resize the short side then centre-crop."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if crop:
        return T.Compose([T.CenterCrop(crop), T.Resize(size, interpolation=bicubic)])
    return T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])


def require_torchvision():
    """The torchvision module (file datasets, PNG grids), or a :class:`DataError` saying how to get it."""
    try:
        import torchvision
    except ImportError as exc:
        raise DataError(
            "this needs torchvision (file datasets, sample grids), which is not installed: "
            "pip install torchvision"
        ) from exc
    return torchvision


def _missing(name: str, root: Path, need: str) -> DataError:
    return DataError(
        f"dataset {name} not found under --data-dir {root}: it needs {need}. "
        "rgflow-fast never downloads data; put the files there (or pass the right --data-dir)."
    )


def _file_dataset(name: str, split: str, root: Path, image_size: int):
    tv = require_torchvision()
    from torchvision import transforms as T

    train = split == "train"
    if name == "cifar10":
        need = (
            "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} "
            "(extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)"
        )
        if not (root / "cifar-10-batches-py" / ("data_batch_1" if train else "test_batch")).is_file():
            raise _missing(name, root, need)
        data = tv.datasets.CIFAR10(str(root), train=train, download=False, transform=T.PILToTensor())
    elif name == "mnist32":
        prefix = "train" if train else "t10k"
        files = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
        if not all((root / "MNIST" / "raw" / f).is_file() for f in files):
            raise _missing(
                name, root, "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (the four MNIST files, un-gzipped)"
            )
        data = tv.datasets.MNIST(
            str(root), train=train, download=False, transform=T.Compose([T.Pad(2), T.PILToTensor()])
        )
    elif name == "celeba32":
        files = [
            "list_eval_partition.txt",
            "list_attr_celeba.txt",
            "identity_CelebA.txt",
            "list_bbox_celeba.txt",
            "list_landmarks_align_celeba.txt",
        ]
        base = root / "celeba"
        if not (base / "img_align_celeba").is_dir() or not all((base / f).is_file() for f in files):
            raise _missing(name, root, "celeba/img_align_celeba/*.jpg and celeba/{" + ",".join(files) + "}")
        try:
            data = tv.datasets.CelebA(
                str(root),
                split="train" if train else "test",
                target_type=[],
                download=False,
                transform=T.Compose([_square(32, crop=148), T.PILToTensor()]),
            )
        except RuntimeError as exc:  # torchvision checks the text files' MD5 sums
            raise _missing(name, root, f"the original CelebA files ({exc})") from exc
        return _ImagesOnly(data)  # target_type=[] yields (image, None)
    else:  # folder
        folder = root / split if (root / "train").is_dir() else root
        if not folder.is_dir():
            raise _missing(name, root, f"a {split}/ sub-folder beside train/")
        transform = T.Compose([_square(image_size), T.PILToTensor()])
        try:
            data = tv.datasets.ImageFolder(str(folder), transform=transform)  # its loader gives RGB
        except (FileNotFoundError, RuntimeError) as exc:
            raise _missing(
                name, root, "images in class sub-folders, DIR/<class>/*.png (or DIR/train/<class>/ and DIR/test/<class>/)"
            ) from exc
        if folder is root:
            # one folder for both splits: every 20th image is held out for testing
            keep = [i for i in range(len(data)) if (i % 20 == 19) == (split == "test")]
            return torch.utils.data.Subset(_ImagesOnly(data), keep)
    return _ImagesOnly(data)


def load_dataset(name: str, split: str = "train", data_dir=None, size: int | None = None, seed: int = 0, image_size=None):
    """A dataset of uint8 images ``(C, L, L)`` for ``split`` ``"train"`` or ``"test"``.

    MSDS sets are generated (``size`` images, default the split's full size; cached) and
    returned as :class:`UInt8Images`; the others are read from ``data_dir`` (``size``,
    when given, keeps the first ``size`` images). Raises :class:`DataError` with what to do
    when the name is unknown or files are missing.
    """
    info = dataset_info(name, image_size)
    if split not in _SPLIT_IDS:
        raise DataError(f"unknown split {split!r}; choose 'train' or 'test'")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise DataError(f"size must be a positive int; got {size!r}")
    if name in GENERATED:
        if size is not None and size > MSDS_SIZES[split]:
            raise DataError(f"{name} has {MSDS_SIZES[split]} {split} images; got size={size}")
        return UInt8Images(_cached_msds(name, split, size, seed))
    if data_dir is None:
        raise DataError(f"dataset {name} is read from files: pass --data-dir DIR ({info.description})")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a folder ({name}: {info.description})")
    data = _file_dataset(name, split, root, info.image_size)
    if size is not None:
        data = torch.utils.data.Subset(data, range(min(size, len(data))))
    return data
