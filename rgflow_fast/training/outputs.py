"""What a run writes and the images every command writes: the run folder (``config.json``,
``metrics.jsonl``, ``checkpoints/step_*.pt``, ``samples/step_*.png``, ``bpd.png``), image
grids, and reading a checkpoint for a command."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, atomic_write, load_checkpoint, model_from_payload, save_checkpoint
from ..data import require_torchvision
from ..model import RGFlow
from ..transforms import to_pixels
from .errors import RunError

__all__ = ["RunFolder", "save_pixels", "save_grid", "save_figure", "plot_bpd", "read_checkpoint"]


def read_checkpoint(path, device="cpu") -> tuple[RGFlow, dict]:
    """``(model on device, payload)`` of a checkpoint; a :class:`RunError` for a missing,
    refused or corrupt file. The file is read on the CPU whatever device wrote it."""
    try:
        payload = load_checkpoint(path, map_location="cpu")
        return model_from_payload(payload, path, device), payload
    except CheckpointError as exc:
        raise RunError(str(exc)) from None


def save_pixels(path, pixels: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Path:
    """Save images ``(n, C, L, L)`` with values in ``[0, 1]`` as one PNG grid (``nrow`` per
    row; default a square grid), written atomically."""
    tv = require_torchvision()
    if pixels.shape[0] == 0:
        raise RunError("no images to save (a batch of 0 images)")
    pixels = pixels.detach().float().cpu()
    nrow = nrow or math.isqrt(pixels.shape[0] - 1) + 1
    return atomic_write(path, lambda f: tv.utils.save_image(pixels, f, nrow=nrow, padding=padding, format="png"))


def save_grid(path, images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> Path:
    """Save logit-space images ``(n, C, L, L)`` (what the model samples) as one PNG grid."""
    return save_pixels(path, to_pixels(images.detach().float()), nrow, padding)


def save_figure(path, figure) -> Path:
    """Write a matplotlib ``Figure`` to ``path`` as PNG, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_bpd(path, history: list[dict]) -> Path:
    """bits/dim against step: train (mean since the previous record) as a line, test as dots."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    train = [(r["step"], r["bpd"]) for r in history if "bpd" in r]
    test = [(r["step"], r["test_bpd"]) for r in history if "test_bpd" in r]
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="train")
    if test:
        ax.plot(*zip(*test), "o", color="tab:red", label="test")
    ax.set(title="bits per dimension", xlabel="training step", ylabel="bits/dim")
    ax.grid(alpha=0.3)
    if train or test:
        ax.legend()
    return save_figure(path, fig)


class RunFolder:
    """The files of one run under ``path``. A folder is a run once it holds a checkpoint:
    one with none (a run stopped before its first checkpoint) is started afresh."""

    def __init__(self, path):
        self.path = Path(path)
        self.metrics = self.path / "metrics.jsonl"

    def checkpoints(self) -> list[Path]:
        """``checkpoints/step_*.pt``, oldest step first."""
        found = []
        for p in (self.path / "checkpoints").glob("step_*.pt"):
            try:
                found.append((int(p.stem.split("_", 1)[1]), p))
            except ValueError:
                continue
        return [p for _, p in sorted(found)]

    def write_config(self, config: dict) -> None:
        atomic_write(self.path / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))

    def history(self, upto: int) -> list[dict]:
        """The metrics records up to step ``upto``, with ``metrics.jsonl`` cut back to them:
        later records belong to a timeline that the resumed run replaces."""
        kept = []
        if upto and self.metrics.exists():
            for line in self.metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if record.get("step", math.inf) <= upto:
                    kept.append(record)
        atomic_write(self.metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        return kept

    def append(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_state(self, model, optimizer, step: int, config: dict, keep: int) -> Path:
        """Write ``checkpoints/step_{step}.pt`` and delete all but the last ``keep``."""
        path = save_checkpoint(self.path / "checkpoints" / f"step_{step:08d}.pt", model,
                               optimizer=optimizer.state_dict(), step=step, train=config)
        for old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
        return path

    def read_state(self, path, device) -> tuple[RGFlow, dict]:
        """The model and payload of a checkpoint to resume from; it must hold training state."""
        model, payload = read_checkpoint(path, device)
        missing = [k for k in ("train", "optimizer", "step") if k not in payload]
        if missing:
            raise RunError(
                f"checkpoint {path} holds a model but no training state ({', '.join(missing)} missing); "
                "it can be sampled or evaluated, not resumed"
            )
        return model, payload
