"""Processes and devices: one process, or DistributedDataParallel under ``torchrun`` (NCCL on
GPUs, gloo on the CPU); the device and backend checks every command shares."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from .. import backends
from .errors import RunError

__all__ = ["World", "resolve_device", "check_backend", "step_generator"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``--device`` of every command: ``auto`` (CUDA when present, else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; a :class:`RunError` for a device this machine lacks."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"--device {name} asked for CUDA but torch sees no CUDA device; use --device cpu")
        index = local_rank if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", index)
    return device


def check_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
    """Raise a :class:`RunError` now if backend ``name`` cannot run on ``device`` in
    ``dtype`` (rather than with a traceback at the first step)."""
    try:
        with backends.use_backend(name):
            backends.resolve(torch.empty(0, device=device, dtype=dtype))
    except (RuntimeError, ValueError) as exc:
        raise RunError(f"--backend {name}: {exc}") from None


def step_generator(device, seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of the dequantisation noise and flips of one step on one rank."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g


class World:
    """Rank, world size and device of this process (one process when not under torchrun)."""

    def __init__(self, device_arg: str):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device_arg, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over the processes (in place)."""
        if self.size > 1:
            dist.all_reduce(t)
            t /= self.size
        return t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the processes (in place)."""
        if self.size > 1:
            dist.all_reduce(t)
        return t

    def check_in_sync(self, model, step: int) -> None:
        """Raise if the ranks' weights differ (a float64 checksum per rank, all-gathered)."""
        if self.size == 1:
            return
        mine = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        if any(not torch.equal(every[0], other) for other in every[1:]):
            raise RunError(
                f"the processes' weights differ at step {step} ({[t.item() for t in every]}); "
                "DistributedDataParallel lost sync, which is a bug: please report it"
            )

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every process (rank 0 writes the last checkpoint while the others are done)."""
        if self.size > 1:
            dist.barrier()

    def close(self):
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
