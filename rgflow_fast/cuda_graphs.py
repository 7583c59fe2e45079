"""CUDA-graph capture of a whole training step (forward, backward, optimizer step) of an
:class:`rgflow_fast.RGFlow` on a fixed-shape batch, replayed with one launch per step.

    step = capture_training_step(model, optimizer, example_batch, loss_fn, clip_grad_norm=1.0)
    for x in loader:                       # every batch of example_batch's shape and dtype
        loss, grad_norm = step(x)          # copies x in, replays; both are (static) tensors

A replay removes the host cost of the step's thousands of kernel launches (the paper model
runs ~1,250 patch-layer evaluations a step). What it needs, and the error it gives otherwise:

- the model, the batch and every parameter on one CUDA device (CPU tensors cannot be captured);
- static shapes: each batch must have the captured shape and dtype (drop or pad the last
  partial batch, e.g. ``DataLoader(..., drop_last=True)``);
- ``memory_efficient=False``: invertible backpropagation (:mod:`rgflow_fast.invertible`) runs
  its own backward pass outside autograd's graph, which a capture cannot replay;
- an optimizer that can be captured: Adam/AdamW/... created with ``capturable=True`` (their step
  count then lives on the device). To change the learning rate between replays, give it as a
  CUDA tensor (``lr=torch.tensor(1e-3, device="cuda")``) and update it in place;
- nothing in ``loss_fn`` that synchronises with the host (``.item()``, data-dependent shapes,
  ``print`` of a tensor): the input finiteness check of :class:`RGFlow` is such a sync and is
  switched off while capturing (a replay does not run Python, so it would not run anyway).

Random numbers (e.g. dequantisation noise drawn in ``loss_fn``) are fresh on every replay.
Before capturing, ``warmup`` eager steps run on a side stream (cuDNN/cuBLAS/Triton pick their
kernels and the optimizer allocates its state); the parameters and the optimizer state are
then put back as they were (state the warm-up created is zeroed, the optimizer's initial state),
so the first replay is the first step.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["CapturedStep", "capture_training_step", "default_loss"]


def default_loss(model, x):
    """``-mean log p(x)`` in nats (``x`` in the model's logit space)."""
    return -model.log_prob(x).mean()


def _check(model, optimizer, example):
    if getattr(model, "memory_efficient", False):
        raise ValueError(
            "a model with memory_efficient=True cannot be captured in a CUDA graph (invertible "
            "backpropagation runs its own backward outside autograd); build it with "
            "memory_efficient=False or train without CUDA graphs"
        )
    for group in optimizer.param_groups:
        if group.get("capturable") is False:
            raise ValueError(
                f"{type(optimizer).__name__} must be created with capturable=True to be captured "
                f"in a CUDA graph (its step count then stays on the device)"
            )
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example_batch must be a tensor; got {type(example).__name__}")
    devices = {p.device for p in model.parameters()} | {example.device}
    if any(d.type != "cuda" for d in devices) or len(devices) != 1:
        raise ValueError(
            f"CUDA graphs need the model and the batch on one CUDA device; got {sorted(map(str, devices))} "
            f"(move them with .to('cuda'))"
        )


class CapturedStep:
    """A captured training step; call it with a batch of the captured shape and dtype to run
    one step. Returns the step's loss and the parameters' global gradient norm (before
    clipping) as tensors that the next call overwrites (clone them to keep them)."""

    def __init__(self, graph, static_input, static_outputs, model):
        self.graph = graph
        self.static_input = static_input
        self.static_outputs = static_outputs
        self.model = model

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape != self.static_input.shape or batch.dtype != self.static_input.dtype:
            raise ValueError(
                f"this step was captured for batches of shape {tuple(self.static_input.shape)} "
                f"({self.static_input.dtype}); got {tuple(batch.shape)} ({batch.dtype}). CUDA graphs "
                f"replay static shapes: drop or pad the last batch (DataLoader(drop_last=True)) "
                f"or capture another step for this shape"
            )
        self.static_input.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


def _snapshot(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in optimizer.state[p].items()}
             for group in optimizer.param_groups for p in group["params"] if p in optimizer.state}
    return params, state


@torch.no_grad()
def _restore(model, optimizer, snapshot):
    params, state = snapshot
    for p, saved in zip(model.parameters(), params):
        p.copy_(saved)
    for group in optimizer.param_groups:
        for p in group["params"]:
            before = state.get(id(p), {})
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                # in place: the captured graph keeps these very tensors
                if key in before and isinstance(before[key], torch.Tensor):
                    value.copy_(before[key])
                else:
                    value.zero_()


def capture_training_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    example_batch: torch.Tensor,
    loss_fn: Callable = default_loss,
    *,
    clip_grad_norm: Optional[float] = None,
    warmup: int = 3,
) -> CapturedStep:
    """Capture ``loss_fn(model, x).backward()``, optional global grad-norm clipping and
    ``optimizer.step()`` for batches shaped like ``example_batch`` (module docstring for the
    requirements; each unmet one raises ``ValueError`` saying what to change)."""
    _check(model, optimizer, example_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    static_input = example_batch.detach().clone()
    check_inputs = getattr(model, "check_inputs", None)

    def step():
        loss = loss_fn(model, static_input)
        loss.backward()
        limit = float("inf") if clip_grad_norm is None else clip_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        optimizer.step()
        return loss, grad_norm

    snapshot = _snapshot(model, optimizer)
    side = torch.cuda.Stream(device=example_batch.device)
    side.wait_stream(torch.cuda.current_stream(example_batch.device))
    try:
        if check_inputs is not None:
            model.check_inputs = False
        with torch.cuda.stream(side):
            for _ in range(warmup):
                optimizer.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream(example_batch.device).wait_stream(side)
        _restore(model, optimizer, snapshot)
        # gradients are written (not accumulated) by the captured backward
        optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_outputs = step()
        except RuntimeError as exc:
            raise RuntimeError(
                f"the training step could not be captured in a CUDA graph ({exc}). Something in "
                f"it synchronises with the host or touches a CPU tensor: .item(), a "
                f"data-dependent shape, a CPU-only backend (use backend 'triton' or 'cuda'), or a "
                f"non-capturable optimizer. Train without CUDA graphs, or remove it from loss_fn"
            ) from exc
    finally:
        if check_inputs is not None:
            model.check_inputs = check_inputs
    return CapturedStep(graph, static_input, static_outputs, model)
