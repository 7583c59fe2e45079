"""Load and save checkpoints of the original RG-Flow code (``layers.MERA`` of ``layers.RNVP``).

Key layout of an original ``state_dict`` (``i`` block in forward order, ``j`` RNVP layer)::

    prior.scale                                  () Laplace b = T/√2, Gaussian std = T
    layers.i.mask_left / mask_right              (C, k, k) checkerboards (fixed)
    layers.i.{s,t}_layers.j.<net keys>           the nets, same names as rgflow_fast.nets
    layers.i.{s,t}_layers.j.scale.saved_mean/var debug buffers the original never reads

Ours: ``blocks.i.layers.j.{s,t}_net.<net keys>`` and ``prior.scale (n_levels,)``. The debug
buffers and masks are kept beside the model (not in its state_dict) so that
``to_original(from_original(sd))`` returns ``sd`` exactly.
"""
from __future__ import annotations

import math
import re

import torch

from .model import RGFlow

__all__ = ["from_original", "to_original", "config_from_original", "original_config"]

_NET_KEY = re.compile(r"^layers\.(\d+)\.([st])_layers\.(\d+)\.(.+)$")
_MASK_KEY = re.compile(r"^layers\.(\d+)\.mask_(left|right)$")
_DEBUG_SUFFIXES = (".scale.saved_mean", ".scale.saved_var")


def _per_level(name, value):
    if isinstance(value, str):
        value = [int(v) for v in value.replace(" ", "").split(",") if v]
        return value[0] if len(value) == 1 else value
    return list(value) if isinstance(value, (list, tuple)) else value


def config_from_original(config: dict) -> dict:
    """Map the original code's arguments (``L``, ``kernel_size``, ``nchannels``, ``prior``,
    ``nlayers``, ``nresblocks``, ``nmlp``, ``nhidden``, optional ``temperature``) to
    :class:`rgflow_fast.RGFlow` keyword arguments. Lists (or comma strings) give one value
    per RG level; other keys of the original's argument set are ignored."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict of the original code's arguments; got {type(config).__name__}")
    required = ("L", "kernel_size", "nchannels", "nlayers", "nresblocks", "nmlp", "nhidden")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}; it needs {list(required)} (and optionally 'prior', 'temperature')")
    if config.get("subnet", "rnvp") != "rnvp":
        raise ValueError(f"only the original's RNVP subnet is supported; got subnet={config['subnet']!r}")
    return {
        "image_size": int(config["L"]),
        "channels": int(config["nchannels"]),
        "kernel_size": int(config["kernel_size"]),
        "n_layers": _per_level("nlayers", config["nlayers"]),
        "n_res_blocks": _per_level("nresblocks", config["nresblocks"]),
        "n_mlp": _per_level("nmlp", config["nmlp"]),
        "hidden": _per_level("nhidden", config["nhidden"]),
        "prior": config.get("prior", "laplace"),
        "temperature": config.get("temperature", 1.0),
    }


def _unwrap(state_dict):
    # Accept the original's full save ({'flow': ..., 'optimizer': ...}) and DataParallel prefixes.
    if "flow" in state_dict and isinstance(state_dict["flow"], dict):
        state_dict = state_dict["flow"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def from_original(state_dict: dict, config: dict) -> RGFlow:
    """Build an :class:`~rgflow_fast.RGFlow` from an original checkpoint's ``state_dict`` and
    its ``config`` (the original's arguments, see :func:`config_from_original`).

    The model takes the checkpoint's floating dtype; the prior's scale is taken from the
    checkpoint (as the original does when it loads one).
    """
    state_dict = _unwrap(state_dict)
    model = RGFlow(**config_from_original(config))
    dtypes = {v.dtype for v in state_dict.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    ours, extras, unexpected = {}, {}, []
    for key, value in state_dict.items():
        net = _NET_KEY.match(key)
        if key == "prior.scale":
            ours["prior.scale"] = value.reshape(1).expand(model.n_levels).clone()
            extras[key] = value
        elif _MASK_KEY.match(key) or key.endswith(_DEBUG_SUFFIXES):
            extras[key] = value
        elif net:
            block, st, layer, rest = net.groups()
            ours[f"blocks.{block}.layers.{layer}.{st}_net.{rest}"] = value
        else:
            unexpected.append(key)
    expected = model.state_dict()
    missing = [to_original_key(k) for k in expected if k not in ours]
    unexpected += [to_original_key(k) for k in ours if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match config {config}: missing keys {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}. Check nlayers/nresblocks/nmlp/nhidden/L/kernel_size."
        )
    bad = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in ours.items() if v.shape != expected[k].shape]
    if bad:
        raise ValueError(f"checkpoint shapes do not match config {config}: (key, checkpoint, expected) {bad[:4]}")
    _check_masks(model, extras)
    model.load_state_dict(ours)
    model.original_extras = extras
    return model


def to_original_key(key: str) -> str:
    """Our state_dict key → the original's."""
    m = re.match(r"^blocks\.(\d+)\.layers\.(\d+)\.([st])_net\.(.+)$", key)
    return f"layers.{m[1]}.{m[3]}_layers.{m[2]}.{m[4]}" if m else key


def _masks(model: RGFlow, dtype):
    k = model.kernel_size
    a = torch.arange(k)
    left = ((a[:, None] + a[None, :]) % 2 == 0).to(dtype).expand(model.channels, k, k).clone()
    return left, 1 - left


def _check_masks(model, extras):
    left, right = _masks(model, torch.float64)
    for key, value in extras.items():
        m = _MASK_KEY.match(key)
        if m and not torch.equal(value.double().cpu(), left if m[2] == "left" else right):
            raise ValueError(f"{key} is not the original's checkerboard mask; this checkpoint is not an RG-Flow RNVP model")


def to_original(model: RGFlow) -> dict:
    """The model's parameters as an original-code ``state_dict`` (load it into the original
    ``layers.MERA`` with the config of :func:`config_from_original`'s inverse)."""
    temperatures = model.prior.temperature
    if len(set(temperatures)) != 1:
        raise ValueError(
            f"the original code has one temperature for all levels; this model has {temperatures}. "
            f"Set one with model.prior.set_temperature(T) first"
        )
    extras = getattr(model, "original_extras", {})
    out = {}
    scale = model.prior.scale[0].detach().clone()
    kept = extras.get("prior.scale")
    out["prior.scale"] = kept if kept is not None and math.isclose(float(kept), float(scale), rel_tol=1e-12) else scale
    ours = model.state_dict()
    dtype = model.prior.scale.dtype
    left, right = _masks(model, dtype)
    features = model.channels * model.kernel_size**2
    for i in range(len(model.blocks)):
        for side, mask in (("left", left), ("right", right)):
            key = f"layers.{i}.mask_{side}"
            out[key] = extras.get(key, mask.clone())
        for key, value in ours.items():
            if key.startswith(f"blocks.{i}."):
                orig = to_original_key(key)
                out[orig] = value
                if orig.endswith(".scale.scale") and ".res_blocks." not in orig:
                    stem = orig[: -len(".scale")]
                    out[stem + ".saved_mean"] = extras.get(stem + ".saved_mean", torch.zeros(features, dtype=dtype))
                    out[stem + ".saved_var"] = extras.get(stem + ".saved_var", torch.ones(features, dtype=dtype))
    return out


def original_config(model: RGFlow) -> dict:
    """The original code's arguments for this model (inverse of :func:`config_from_original`)."""
    pl = model.per_level
    return {
        "L": model.image_size,
        "kernel_size": model.kernel_size,
        "nchannels": model.channels,
        "prior": model.prior.kind,
        "nlayers": pl["n_layers"],
        "nresblocks": pl["n_res_blocks"],
        "nmlp": pl["n_mlp"],
        "nhidden": pl["hidden"],
        "temperature": model.prior.temperature[0],
    }
