"""Invertible backpropagation: train a flow without storing per-block activations.

The forward pass runs every block without autograd and keeps only the flow's output. The
backward pass walks the blocks from the last to the first: it rebuilds a block's input by
inverting its output, re-runs that block's forward with autograd on, back-propagates
through it, and moves on. Activation memory is that of one block, whatever the depth;
gradients equal the ordinary backward up to the float rounding of the rebuilt inputs.
"""
from __future__ import annotations

import torch

__all__ = ["invertible_forward"]


class _InvertibleFlow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, blocks, *params):
        with torch.no_grad():
            ldj = x.new_zeros(x.shape[0])
            for block in blocks:
                x, block_ldj = block(x)
                ldj = ldj + block_ldj
        ctx.blocks = blocks
        ctx.save_for_backward(x)
        return x, ldj

    @staticmethod
    def backward(ctx, grad_z, grad_ldj):
        (y,) = ctx.saved_tensors
        grads = []
        if grad_ldj is None:
            grad_ldj = y.new_zeros(y.shape[0])
        if grad_z is None:
            grad_z = torch.zeros_like(y)
        for block in reversed(ctx.blocks):
            with torch.no_grad():
                x = block.inverse(y)[0]
            params = list(block.parameters())
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                y_re, ldj_re = block(x_in)
                trainable = [p for p in params if p.requires_grad]
                # ldj is summed over blocks, so every block sees the same grad_ldj
                got = torch.autograd.grad(
                    (y_re, ldj_re), [x_in] + trainable, (grad_z, grad_ldj), allow_unused=True
                )
            grad_z = got[0]
            it = iter(got[1:])
            grads.append([next(it) if p.requires_grad else None for p in params])
            y = x
        flat = [g for block_grads in reversed(grads) for g in block_grads]
        return (grad_z, None, *flat)


def invertible_forward(blocks, x):
    """Run ``blocks`` (each with ``forward(x) -> (y, ldj)`` and ``inverse(y) -> (x, inv_ldj)``)
    on ``x``; returns ``(z, ldj (B,))`` whose backward recomputes instead of storing."""
    blocks = list(blocks)
    params = [p for b in blocks for p in b.parameters()]
    return _InvertibleFlow.apply(x, blocks, *params)
