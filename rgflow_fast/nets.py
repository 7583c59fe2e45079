"""The conditioner networks of RG-Flow's couplings: residual MLPs of weight-normalised
linear layers with learnable-β Swish, √2 residual scaling and a zero-initialised final
per-feature scale (so that a fresh flow is the identity).

Parameter names follow the original code, so checkpoints map key by key.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Swish", "WNLinear", "Scale", "ResidualMLP", "net_layout"]


class Swish(nn.Module):
    """``Swish_β(v) = v * sigmoid(β ⊙ v)``, ``β (features,)`` initialised to 1."""

    def __init__(self, num_features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_features))

    def forward(self, v):
        return v * torch.sigmoid(self.scale * v)


class WNLinear(nn.Module):
    """Linear layer weight-normalised over dim 0: ``W = g ⊙ V / ‖V‖_row``, ``y = v Wᵀ + b``.

    ``weight_v (out, in) ~ U(±sqrt(2.81·3/in))`` (2.81 is Swish's gain), ``weight_g (out, 1)
    = ‖V‖_row`` at init, ``bias (out,) = 0``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        bound = math.sqrt(2.81 * 3 / in_features)
        v = torch.empty(out_features, in_features).uniform_(-bound, bound)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=1, keepdim=True))
        self.bias = nn.Parameter(torch.zeros(out_features))

    @property
    def weight(self):
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, v):
        return F.linear(v, self.weight, self.bias)


class Scale(nn.Module):
    """Per-feature output scale ``σ ⊙ v``, zero-initialised."""

    def __init__(self, num_features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(num_features))

    def forward(self, v):
        return self.scale * v


class ResidualMLP(nn.Module):
    """``σ ⊙ R(v)`` on ``v (N, features)``: for each residual block ``v ← (v + F(v))/√2`` with
    ``F = Swish → WNLinear → Swish → … → WNLinear`` over ``widths = [features, hidden…, features]``.
    """

    def __init__(self, features: int, hidden: int, n_mlp: int, n_res_blocks: int):
        super().__init__()
        widths = [features] + [hidden] * n_mlp + [features]
        self.res_blocks = nn.ModuleList(
            nn.Sequential(
                *[
                    m
                    for w_in, w_out in zip(widths[:-1], widths[1:])
                    for m in (Swish(w_in), WNLinear(w_in, w_out))
                ]
            )
            for _ in range(n_res_blocks)
        )
        self.scale = Scale(features)

    def forward(self, v):
        for block in self.res_blocks:
            v = (v + block(v)) / math.sqrt(2)
        return self.scale(v)

    def op_parameters(self) -> list[torch.Tensor]:
        """The flat parameter list of :mod:`rgflow_fast.coupling_layer`: per residual block and
        linear layer ``β, V, g, b`` (the Swish before the layer, then the layer), then ``σ``."""
        flat = []
        # the modules' parameter dicts directly: attribute lookups through nn.Module, and
        # slicing a Sequential, cost more than a small level's layer
        for block in self.res_blocks:
            modules = list(block)
            for swish, linear in zip(modules[0::2], modules[1::2]):
                weights = linear._parameters
                flat += [swish._parameters["scale"], weights["weight_v"], weights["weight_g"], weights["bias"]]
        return flat + [self.scale._parameters["scale"]]


def net_layout(num_params: int, n_mlp: int) -> int:
    """``n_res_blocks`` of a coupling layer whose flat ``params`` list (both nets'
    :meth:`ResidualMLP.op_parameters`, S then T) has ``num_params`` tensors."""
    per_block = 4 * (n_mlp + 1)
    per_net, odd = divmod(num_params, 2)
    n_res, rest = divmod(per_net - 1, per_block)
    if odd or per_net < 1 or rest:
        raise ValueError(
            f"params must hold 2·(4·n_res_blocks·(n_mlp + 1) + 1) tensors (the S net's, then the "
            f"T net's, as ResidualMLP.op_parameters lists them); got {num_params} for n_mlp={n_mlp}"
        )
    return n_res
