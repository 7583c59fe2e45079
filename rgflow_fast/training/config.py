"""The run config: one frozen dataclass, its presets, and what a resumed run must keep."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields

import torch

from ..data import DATASETS, GENERATED
from .errors import RunError

__all__ = ["RunConfig", "PRESETS", "RESUME_FIELDS", "MODEL_FIELDS", "DTYPES", "paper_temperature", "resolve"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a training run's result (how it runs — device, backend,
    workers — is :class:`~rgflow_fast.training.loop.RunOptions`). Defaults are the
    published setup: AdamW (lr 1e-3, weight decay 5e-5), grad-norm clip 1, batch 64."""

    preset: str = "small"
    dataset: str = "msds1"
    data_dir: str | None = None
    data_seed: int = 0
    image_size: int | None = None  # only for dataset "folder"
    train_size: int | None = None  # first N images; None: all
    test_size: int | None = None
    kernel_size: int = 4
    n_layers: tuple[int, ...] = (4,)  # one value, or one per RG level
    n_res_blocks: tuple[int, ...] = (4,)
    n_mlp: tuple[int, ...] = (2,)
    hidden: tuple[int, ...] = (512,)
    prior: str = "laplace"
    dtype: str = "float32"
    steps: int | None = None  # exactly one of steps and epochs is set
    epochs: int | None = None
    batch_size: int = 64  # global, split over processes
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": from lr to lr/100 over the run's steps
    weight_decay: float = 5e-5
    clip_grad: float = 1.0  # 0: no clipping
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 2000
    keep: int = 3
    sample_n: int = 64
    sample_temperature: tuple[float, ...] | None = None  # None: paper_temperature
    world_size: int = 1

    def __post_init__(self):
        for name in ("n_layers", "n_res_blocks", "n_mlp", "hidden", "sample_temperature"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):  # JSON gives lists; frozen fields want tuples
                object.__setattr__(self, name, tuple(value))
        _validate(self)

    def to_dict(self) -> dict:
        """Plain JSON values (lists, not tuples), as ``config.json`` and checkpoints hold them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, saved: dict) -> "RunConfig":
        """The config a run saved (unknown keys — derived values such as ``steps_total`` — dropped)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def model_kwargs(self, channels: int, image_size: int) -> dict:
        """Keyword arguments of :class:`~rgflow_fast.RGFlow` for this config."""
        one = lambda v: v[0] if len(v) == 1 else list(v)  # noqa: E731
        return dict(
            image_size=image_size, channels=channels, kernel_size=self.kernel_size,
            n_layers=one(self.n_layers), n_res_blocks=one(self.n_res_blocks), n_mlp=one(self.n_mlp),
            hidden=one(self.hidden), prior=self.prior,
        )

    def lr_at(self, step: int, total: int) -> float:
        """The learning rate of step ``step`` (0-based) of ``total``."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(step / max(total - 1, 1), 1.0)
        return self.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


# The fields that decide the trajectory: a resumed run must match its checkpoint in these.
MODEL_FIELDS = ("kernel_size", "n_layers", "n_res_blocks", "n_mlp", "hidden", "prior")
RESUME_FIELDS = (
    "dataset", "data_seed", "image_size", "train_size", *MODEL_FIELDS, "dtype", "batch_size", "lr",
    "lr_schedule", "weight_decay", "clip_grad", "seed", "world_size",
)

# Values a preset sets; explicit flags override them.
PRESETS = {
    # the quick start: ellipses in its samples in a few minutes on a 2-core CPU
    "small": dict(
        train_size=20_000, test_size=1_000, n_layers=(2,), n_res_blocks=(1,), n_mlp=(1,), hidden=(128,),
        batch_size=16, steps=4000, lr=1.5e-2, lr_schedule="cosine", log_every=50, ckpt_every=1000,
        sample_temperature=(0.9,),
    ),
    # the paper's MSDS model: 4 layers per level, otherwise the CelebA-32 sizes
    "paper-msds": dict(epochs=500, ckpt_every=2000),
    "paper-celeba": dict(dataset="celeba32", n_layers=(8, 6, 4, 2), epochs=500, ckpt_every=2000),
}


def paper_temperature(n_levels: int, low: float = 0.2, high: float = 0.8) -> list[float]:
    """The paper's mixed temperature: ``low`` on level 0 (finest), ``high`` on the others."""
    return [low] + [high] * (n_levels - 1)


def _validate(cfg: RunConfig) -> None:
    if cfg.preset not in PRESETS:
        raise RunError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.dataset not in DATASETS:
        raise RunError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.dataset in GENERATED and cfg.data_dir is not None:
        raise RunError(f"dataset {cfg.dataset} is generated and reads no files: drop --data-dir {cfg.data_dir}")
    if (cfg.steps is None) == (cfg.epochs is None):
        raise RunError("give the run's length as exactly one of --steps and --epochs")
    positive = ("steps", "epochs", "batch_size", "log_every", "ckpt_every", "keep", "sample_n", "world_size",
                "train_size", "test_size")
    for name in positive:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.clip_grad < 0:
        raise RunError(f"need --lr > 0, --weight-decay >= 0 and --clip-grad >= 0; got {cfg.lr}, "
                       f"{cfg.weight_decay}, {cfg.clip_grad}")
    if cfg.dtype not in DTYPES:
        raise RunError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if cfg.lr_schedule not in SCHEDULES:
        raise RunError(f"unknown lr schedule {cfg.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")


def resolve(flags: dict, saved: RunConfig | None, world_size: int) -> RunConfig:
    """The run's config: the preset (or the resumed run's ``saved`` config), then the
    explicit ``flags`` (field name → value; ``None`` means not given).

    A resumed run must agree with ``saved`` on :data:`RESUME_FIELDS`; otherwise a
    :class:`RunError` lists each difference.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    preset = given.pop("preset", None)
    if "steps" in given or "epochs" in given:  # one length replaces the other
        given = {"steps": None, "epochs": None, **given}
    if saved is None:
        base = RunConfig(preset=preset or "small", **PRESETS[preset or "small"])
    elif preset is not None and preset != saved.preset:
        raise RunError(
            f"--preset {preset} differs from the resumed run's preset {saved.preset}; drop --preset to "
            "continue that run, or start a new run with another --out"
        )
    else:
        base = saved
    cfg = dataclasses.replace(base, **given, world_size=world_size)
    if saved is not None:
        diff = [name for name in RESUME_FIELDS if getattr(cfg, name) != getattr(saved, name)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {getattr(saved, k)!r}, now {getattr(cfg, k)!r}" for k in diff)
            raise RunError(
                f"cannot resume with a different config ({detail}); drop those flags to continue the run "
                "(or use as many processes as it had), or start a new run with another --out"
            )
    return cfg
