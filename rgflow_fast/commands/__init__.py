"""The ``rgflow-fast`` subcommands: training (``train``, ``sample``, ``eval``) and the
paper's analyses (``receptive-fields``, ``mix``, ``inpaint``, ``walk``, ...).

Every command reports a bad input as one line ``rgflow-fast NAME: error: ...`` on stderr
and exits with status 2 (1 for a training stopped by a non-finite loss); the library
raises, only this layer prints and exits.
"""
from __future__ import annotations

import os
import sys

import torch

from .. import backends
from ..data import DataError
from ..training.distributed import check_backend, resolve_device
from ..training.errors import NonFiniteLoss, RunError

__all__ = ["guard", "add_system_flags", "require_positive", "set_threads", "setup", "add_commands"]


def guard(func, name: str):
    """Run ``func(args)``; report :class:`RunError` and :class:`DataError` as one line and
    return 2 (1 for :class:`NonFiniteLoss`)."""

    def run(args) -> int:
        try:
            return func(args)
        except (RunError, DataError) as exc:
            prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"rgflow-fast {name}: error: {prefix}{exc}", file=sys.stderr, flush=True)
            return 1 if isinstance(exc, NonFiniteLoss) else 2

    return run


def add_system_flags(p) -> None:
    """``--device``, ``--backend`` and ``--threads``: the same meaning in every command."""
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS,
                   help="RG op backend (rgflow-fast info lists what runs here)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: torch's, one per core); on a busy machine 1 is often "
                        "much faster")


def require_positive(args, *names: str) -> None:
    """A :class:`RunError` unless each flag ``--name`` is >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RunError(f"--{name.replace('_', '-')} must be >= 1; got {value}")


def set_threads(args) -> None:
    """Apply ``--threads``."""
    require_positive(args, "threads")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def setup(args, dtype=torch.float32) -> torch.device:
    """Apply ``--threads``, check ``--device`` and ``--backend``; returns the device."""
    set_threads(args)
    device = resolve_device(args.device)
    check_backend(args.backend, device, dtype)
    return device


def add_commands(sub) -> None:
    """Add every subcommand to the ``rgflow-fast`` parser."""
    from . import analysis, training

    training.add_commands(sub)
    analysis.add_commands(sub)
