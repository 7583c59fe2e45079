"""The ``rgflow-fast`` command (also ``python -m rgflow_fast``)."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys


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
    lines.append(f"backends    {', '.join(rf.available_backends())} (requested: {rf.current_backend()})")
    print("\n".join(lines))
    return 0


# Modules that add subcommands: each has ``add_commands(subparsers)``.
COMMAND_MODULES = ("rgflow_fast.train", "rgflow_fast.analysis")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rgflow-fast", description="Fast, exact RG-Flow: train, sample, evaluate and analyse."
    )
    parser.add_argument("--version", action="version", version=f"rgflow-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, available backends and device")
    info.set_defaults(func=_info)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)
