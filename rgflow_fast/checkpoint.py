"""Checkpoints: written atomically (temp file in the same folder, fsync, rename) and read
with ``torch.load(weights_only=True)``.

A checkpoint is a dict ``{"format": FORMAT, "config": RGFlow.config, "model": state_dict,
...}``; trainers add their own keys (optimizer state, step, RNG states), all made of
tensors and plain Python values so that ``weights_only`` loading accepts them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .model import RGFlow

__all__ = ["FORMAT", "atomic_write", "save_checkpoint", "load_checkpoint", "load_model"]

FORMAT = "rgflow_fast/1"


def atomic_write(path, write) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync it and rename it to
    ``path``: a reader sees the old file or the new one, never a partial write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path, model: RGFlow, **extra) -> Path:
    """Write ``model`` (config + state_dict) and ``extra`` entries to ``path`` atomically
    (:func:`atomic_write`)."""
    payload = {"format": FORMAT, "config": model.config, "model": model.state_dict(), **extra}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(
            f"checkpoint {path} is corrupt or not a rgflow_fast checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); use another checkpoint or retrain"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint {path} is not a rgflow_fast checkpoint (format "
            f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}, "
            f"expected {FORMAT!r}); for the original RG-Flow code's files use rgflow_fast.from_original"
        )
    return payload


def load_model(path, map_location="cpu") -> RGFlow:
    """Rebuild the :class:`RGFlow` stored in a checkpoint, in the checkpoint's dtype."""
    payload = load_checkpoint(path, map_location)
    model = RGFlow(**payload["config"])
    state = payload["model"]
    dtype = state["prior.scale"].dtype
    model = model.to(device=state["prior.scale"].device, dtype=dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not match its own config: {exc}") from exc
    return model
