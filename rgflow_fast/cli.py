"""The ``rgflow-fast`` command (also ``python -m rgflow_fast``)."""
from __future__ import annotations

import argparse
import platform
import sys

from .commands import add_commands


def _info(args) -> int:
    import torch

    import rgflow_fast as rf

    lines = [
        f"rgflow_fast {rf.__version__}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton      {triton.__version__}")
    except ImportError:
        lines.append("triton      not installed")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device      cuda ({names})")
    else:
        lines.append(f"device      cpu ({torch.get_num_threads()} threads), no CUDA device")
    lines.append(f"backends    {_backends(torch)} (requested: {rf.current_backend()})")
    print("\n".join(lines))
    return 0


def _backends(torch) -> str:
    """The backends that load, each marked with what it can run on here."""
    import rgflow_fast as rf

    from .training.distributed import check_backend
    from .training.errors import RunError

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = []
    for name in rf.available_backends():
        try:
            check_backend(name, device)
        except RunError:
            parts.append(f"{name} (loads, but cannot run on this machine's {device.type} device)")
            continue
        interpreted = name == "triton" and device.type == "cpu"
        parts.append(f"{name} (interpreter only: slow, for tests)" if interpreted else name)
    return ", ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rgflow-fast", description="Fast, exact RG-Flow: train, sample, evaluate and analyse."
    )
    parser.add_argument("--version", action="version", version=f"rgflow-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, available backends and device")
    info.set_defaults(func=_info)
    add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)
