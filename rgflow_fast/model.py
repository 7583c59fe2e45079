"""The RG-Flow model: a MERA-like stack of RG blocks, each an RNVP coupling stack acting on
the block's dilated, strided, periodically wrapped patches.

Direction: ``forward`` is data → latent and returns ``(z, ldj)`` with
``ldj = log|det ∂z/∂x|``; ``inverse(z)`` returns ``(x, -ldj)``;
``log_prob(x) = ldj + prior.log_prob(z)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import backends
from .coupling_layer import PRECISIONS
from .geometry import BlockSpec, block_specs, num_levels
from .invertible import invertible_forward
from .nets import ResidualMLP
from .priors import Prior

__all__ = ["RGFlow", "RGBlock", "CouplingLayer"]


class CouplingLayer(nn.Module):
    """RNVP layer ``j``: nets ``S_j``, ``T_j`` on flattened patches ``(N, C·k·k)``, applied in
    two checkerboard steps (parity 0, then parity 1) with the same nets — one call of the
    fused op :func:`rgflow_fast.coupling_layer.rg_coupling_layer`."""

    def __init__(self, features: int, hidden: int, n_mlp: int, n_res_blocks: int):
        super().__init__()
        self.n_mlp = n_mlp
        self.s_net = ResidualMLP(features, hidden, n_mlp, n_res_blocks)
        self.t_net = ResidualMLP(features, hidden, n_mlp, n_res_blocks)

    def nets(self, v):
        """Raw ``(s, t)`` (``s`` before tanh) for masked patches ``v (N, C, k, k)``."""
        flat = v.reshape(v.shape[0], -1)
        return self.s_net(flat).view_as(v), self.t_net(flat).view_as(v)

    def op_parameters(self) -> list[torch.Tensor]:
        """Both nets' parameters in the op's flat order (S, then T)."""
        return self.s_net.op_parameters() + self.t_net.op_parameters()


class RGBlock(nn.Module):
    """One RG block: gathers its patches, runs ``n_layers`` coupling layers on them, scatters back.

    Every backend runs the same path: one gather, one fused
    :func:`~rgflow_fast.coupling_layer.rg_coupling_layer` per layer on the patch tensor, one
    scatter. The backend is resolved once per call. ``recompute`` (set by
    ``RGFlow(memory_efficient=True)``) lets the layers keep only their inputs for backward;
    ``precision`` (set by ``RGFlow(precision=...)``) is the fused GPU layer's math.
    """

    def __init__(self, spec: BlockSpec, channels: int, n_layers: int, n_res_blocks: int, n_mlp: int, hidden: int):
        super().__init__()
        self.spec = spec
        self.recompute = False
        self.precision = "fp32"
        features = channels * spec.kernel_size**2
        self.layers = nn.ModuleList(
            CouplingLayer(features, hidden, n_mlp, n_res_blocks) for _ in range(n_layers)
        )

    def _run(self, x, inverse: bool):
        backend = backends.resolve(x)
        geometry = self.spec.kernel_size, self.spec.dilation, self.spec.offset
        u = backend.rg_gather(x, *geometry)
        ldj = x.new_zeros(x.shape[0])
        for layer in reversed(self.layers) if inverse else self.layers:
            u, ldj = backend.rg_coupling_layer(
                u, ldj, layer.op_parameters(), layer.n_mlp, inverse, self.recompute, self.precision
            )
        return backend.rg_scatter(u, x, *geometry), ldj

    def forward(self, x):
        return self._run(x, inverse=False)

    def inverse(self, z):
        return self._run(z, inverse=True)


def _per_level(name, value, n_levels):
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n_levels
    if len(values) != n_levels:
        raise ValueError(
            f"{name} needs one value per RG level ({n_levels} levels for this image and kernel "
            f"size) or a single int; got {list(value)}"
        )
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "n_res_blocks" else 1):
            raise ValueError(f"{name} must hold positive ints; got {values}")
    return values


class RGFlow(nn.Module):
    """RG-Flow on images ``(B, channels, image_size, image_size)`` in logit space.

    Defaults are the paper's CelebA-32 config (with ``image_size=32, channels=3``).
    ``n_layers``, ``n_res_blocks``, ``n_mlp`` and ``hidden`` take one int, or one value per
    RG level (both blocks of a level use it). ``temperature`` is the prior's: a float, or one
    value per level.

    ``memory_efficient=True`` trains with invertible backpropagation
    (:mod:`rgflow_fast.invertible`): no per-block activations are stored; the backward pass
    rebuilds each block's input by inverting its output, and each coupling layer keeps only
    its input, recomputing its nets' activations. Same gradients up to float rounding.

    ``precision`` is the math of the conditioner nets' products in the fused GPU (Triton)
    layer: ``"fp32"`` (exact float32, the default), ``"tf32"`` (TF32 tensor cores) or
    ``"bf16"`` (bfloat16 operands, float32 accumulation); the tolerance of each against the
    float32 reference is in :mod:`rgflow_fast.triton_layer`. The reference and the CPU backend
    always compute in the tensors' own dtype. It can be changed at any time
    (``model.precision = "bf16"``), e.g. to train in bf16 and evaluate in fp32.

    ``check_inputs`` (default True) validates every input, including a finiteness check
    that costs one device sync per call: NaN or inf input raises ``ValueError``. Set it to
    False to skip the check (then NaN propagates to the outputs).
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        kernel_size: int = 4,
        n_layers=(8, 6, 4, 2),
        n_res_blocks=4,
        n_mlp=2,
        hidden=512,
        prior: str = "laplace",
        temperature=1.0,
        memory_efficient: bool = False,
        precision: str = "fp32",
    ):
        super().__init__()
        n = num_levels(image_size, kernel_size)
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"channels must be a positive int; got {channels!r}")
        per_level = {
            "n_layers": _per_level("n_layers", n_layers, n),
            "n_res_blocks": _per_level("n_res_blocks", n_res_blocks, n),
            "n_mlp": _per_level("n_mlp", n_mlp, n),
            "hidden": _per_level("hidden", hidden, n),
        }
        self.image_size = image_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.n_levels = n
        self.per_level = per_level
        self.blocks = nn.ModuleList(
            RGBlock(
                spec,
                channels,
                per_level["n_layers"][spec.level],
                per_level["n_res_blocks"][spec.level],
                per_level["n_mlp"][spec.level],
                per_level["hidden"][spec.level],
            )
            for spec in block_specs(image_size, kernel_size)
        )
        self.prior = Prior(prior, channels, image_size, kernel_size, temperature)
        self.check_inputs = True
        self.memory_efficient = memory_efficient
        self.precision = precision

    @property
    def memory_efficient(self) -> bool:
        """Train with invertible backpropagation, the layers recomputing their activations."""
        return self._memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool):
        self._memory_efficient = bool(value)
        for block in self.blocks:
            block.recompute = self._memory_efficient

    @property
    def precision(self) -> str:
        """The math of the fused coupling layers on a GPU (:data:`PRECISIONS`)."""
        return self._precision

    @precision.setter
    def precision(self, value: str):
        if value not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {value!r}")
        self._precision = value
        for block in self.blocks:
            block.precision = value

    @property
    def config(self) -> dict:
        """Constructor arguments that rebuild this model (JSON-serialisable)."""
        temperature = self.prior.temperature
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "kernel_size": self.kernel_size,
            **self.per_level,
            "prior": self.prior.kind,
            "temperature": temperature[0] if len(set(temperature)) == 1 else temperature,
        }

    def _check(self, x, name):
        if not self.check_inputs:
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        expected = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{name} must have shape (B, {', '.join(map(str, expected))}) for this model; "
                f"got {tuple(x.shape)}"
            )
        param = next(self.parameters())
        if x.dtype != param.dtype or x.device != param.device:
            raise ValueError(
                f"{name} is {x.dtype} on {x.device} but the model is {param.dtype} on "
                f"{param.device}; convert one of them (e.g. x.to(model_dtype, model_device) or "
                f"model.to(x.dtype))"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"{name} contains NaN or inf; RG-Flow works in logit space, so map images with "
                f"rgflow_fast.transforms.logit_transform first (set model.check_inputs = False to "
                f"skip this check)"
            )

    def forward(self, x):
        """``x (B, C, L, L) -> (z, ldj (B,))``, data to latent."""
        self._check(x, "x")
        if x.shape[0] == 0:  # nothing to transform (the ops' per-image reductions need an image)
            return x.clone(), x.new_zeros(0)
        if self.memory_efficient and torch.is_grad_enabled():
            return invertible_forward(self.blocks, x)
        ldj = x.new_zeros(x.shape[0])
        for block in self.blocks:
            x, block_ldj = block(x)
            ldj = ldj + block_ldj
        return x, ldj

    def inverse(self, z):
        """``z (B, C, L, L) -> (x, inv_ldj (B,))``, latent to data; ``inv_ldj = -ldj``."""
        self._check(z, "z")
        if z.shape[0] == 0:
            return z.clone(), z.new_zeros(0)
        inv_ldj = z.new_zeros(z.shape[0])
        for block in reversed(self.blocks):
            z, block_ldj = block.inverse(z)
            inv_ldj = inv_ldj + block_ldj
        return z, inv_ldj

    def log_prob(self, x):
        """``log p(x) = ldj + prior.log_prob(z)``, ``(B,)`` (nats, logit space)."""
        z, ldj = self(x)
        return ldj + self.prior.log_prob(z)

    @torch.no_grad()
    def sample(self, n: int, temperature=None, generator=None):
        """``n`` images ``(n, C, L, L)`` in logit space, from the prior at ``temperature``
        (a float, or one value per RG level; default: the model's own)."""
        z = self.prior.sample(n, temperature, generator=generator)
        return self.inverse(z)[0]

    @property
    def num_dims(self) -> int:
        """``C·L²``, the number of dimensions of one image."""
        return self.channels * self.image_size**2

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
