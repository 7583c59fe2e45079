"""Checkpoints: written atomically (temp file in the same folder, fsync, rename) and read
with ``torch.load(weights_only=True)``.

A checkpoint is a dict ``{"format": FORMAT, "config": RGFlow.config, "model": state_dict,
...}``; trainers add their own keys (optimizer state, step, run config), all made of
tensors and plain Python values so that ``weights_only`` loading accepts them.

    model = rgflow_fast.load_model("runs/msds1-small-.../checkpoints/step_00002000.pt")
"""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

from .model import RGFlow

__all__ = ["FORMAT", "CheckpointError", "atomic_write", "save_checkpoint", "load_checkpoint", "load_model"]

FORMAT = "rgflow_fast/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used (missing, refused, corrupt, or not matching its own
    config); the message says what to do."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> Path:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync it and rename it to
    ``path``: a reader sees the old file or the new one, never a partial write. The file
    gets the mode a plain ``open`` would give it (``0o666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files, unreadable by colleagues
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


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    """The error for a file ``torch.load(weights_only=True)`` would not read. torch's own
    message advises ``weights_only=False``, which is wrong for a file of unknown origin."""
    text = str(exc)
    blocked = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: [^\s]+)", text, re.IGNORECASE)
    if blocked:
        return CheckpointError(
            f"checkpoint {path} was refused: it holds Python objects other than tensors and plain "
            f"values ({blocked.group(1)}), and loading those could run arbitrary code. rgflow_fast "
            "never loads such files; use a checkpoint written by rgflow-fast, or retrain"
        )
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a rgflow_fast checkpoint (truncated, or not a file "
        "torch.save wrote); it was not loaded. Use another checkpoint (a run keeps its last --keep) "
        "or retrain"
    )


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``); raises
    :class:`CheckpointError` for a missing, refused or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a step_*.pt file of a run")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise _refusal(path, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a rgflow_fast checkpoint (format "
            f"{payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}, "
            f"expected {FORMAT!r}); for the original RG-Flow code's files use rgflow_fast.from_original"
        )
    return payload


def model_from_payload(payload: dict, path, device="cpu") -> RGFlow:
    """The :class:`RGFlow` of a loaded checkpoint ``payload``, in its dtype, on ``device``."""
    try:
        model = RGFlow(**payload["config"])
        state = payload["model"]
        model = model.to(dtype=state["prior.scale"].dtype)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {exc}") from exc
    return model.to(device)


def load_model(path, device="cpu") -> RGFlow:
    """Rebuild the :class:`RGFlow` stored in a checkpoint (a ``step_*.pt`` file of a run),
    in the checkpoint's dtype, on ``device``; in eval mode.

    The file is read on the CPU whatever device wrote it, then moved to ``device``.
    """
    path = Path(path)
    return model_from_payload(load_checkpoint(path, map_location="cpu"), path, device).eval()
