"""The paper's analysis tools: causal cones, receptive fields, hyperbolic mixing, latent
walks and inpainting (RG-Flow, Eq. 8 and 9, Figs. 2-6, 10-13, Appendix D).

Images here are in the flow's logit space, ``(B, C, L, L)`` as :class:`rgflow_fast.RGFlow`
takes them; map pixels in ``[0, 1]`` with :func:`rgflow_fast.transforms.logit_transform`.
``R`` is the flow's forward map (data → latent), ``G = R⁻¹`` the generator. A latent is
``l = (channel, i, j)``; its RG level is :func:`latent_levels` ``[i, j]``.

Causal cones come from the block structure alone: every block is a bijection on each of its
(disjoint) patches, so a change inside a patch can reach every pixel of that patch and no
other. Propagating a boolean mask through the blocks — forward order for the inference cone,
reverse order (top level first) for the generation cone — gives the exact set of positions
that can change. Each RNVP stack of two or more coupling layers does mix all ``C·k²``
elements of its patch (an element changed at step 1 reaches the other checkerboard half at
step 2 and its own half at step 3), so for a generic model the cone is also the set that
does change; with a single layer per block it is an upper bound.

Defaults are chosen to show an effect and to be reproducible: :func:`pick_latents` chooses
receptive-field latents from a seed (0 unless given), and :func:`walk` without ``values``
sweeps the latent over ``±4`` prior standard deviations (:func:`walk_values`), where the old
``0 … 1.5`` moved a top-level latent's frames by only a few 1/255.
:func:`latent_correlation` is the authors' disentanglement measure (their
``test_latent_corr.py``): the correlation matrix of one RG level's latents over a dataset.

The subcommands ``receptive-fields``, ``mix``, ``inpaint`` and ``walk`` of ``rgflow-fast``
(:mod:`rgflow_fast.commands.analysis`) write these analyses as PNGs;
:mod:`rgflow_fast.figures` draws them as labelled figures.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

from .backends import use_backend
from .geometry import block_specs, latent_levels, num_levels, patch_indices

__all__ = [
    "latent_levels",
    "causal_cone",
    "generation_cone",
    "inference_cone",
    "pick_latents",
    "receptive_fields",
    "receptive_field",
    "receptive_field_strengths",
    "strength_statistics",
    "mix",
    "walk",
    "walk_values",
    "inpaint",
    "latent_correlation",
    "LatentCorrelation",
]

_DIRECTIONS = ("generation", "inference")


# ----------------------------------------------------------------------------- causal cones


def causal_cone(mask: torch.Tensor, kernel_size: int, direction: str) -> torch.Tensor:
    """Propagate boolean masks ``(..., L, L)`` through the blocks of an RG-Flow.

    ``direction="inference"``: ``mask`` marks pixels; returns the latent positions that a
    change of those pixels can reach (blocks in forward order). ``direction="generation"``:
    ``mask`` marks latent positions; returns the pixels they can change (blocks in inverse
    order, top level first). Through each block, a position is in the output iff it lies in
    a patch holding a marked position, or is marked and lies in no patch. The cone of a set
    is the union of the cones of its members.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}; got {direction!r}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        raise TypeError(f"mask must be a bool tensor of shape (..., L, L); got {_describe(mask)}")
    L = mask.shape[-1]
    if mask.shape[-2] != L:
        raise ValueError(f"mask must be square (..., L, L); got {tuple(mask.shape)}")
    specs = block_specs(L, kernel_size)
    if direction == "generation":
        specs = specs[::-1]
    out = mask.clone()
    for spec in specs:
        rows, cols = patch_indices(L, kernel_size, spec.dilation, spec.offset, mask.device)
        hit = out[..., rows, cols].any(dim=-1, keepdim=True)  # (..., P, 1)
        out[..., rows, cols] = hit.expand(*hit.shape[:-1], rows.shape[-1])
    return out


def _point(image_size: int, kernel_size: int, i: int, j: int, device=None) -> torch.Tensor:
    num_levels(image_size, kernel_size)
    for name, v in (("i", i), ("j", j)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < image_size:
            raise ValueError(f"{name} must be an int in [0, {image_size}); got {v!r}")
    mask = torch.zeros(image_size, image_size, dtype=torch.bool, device=device)
    mask[i, j] = True
    return mask


def generation_cone(image_size: int, kernel_size: int, i: int, j: int) -> torch.Tensor:
    """Pixels ``(L, L)`` bool that the latent at ``(i, j)`` (any channel) can change."""
    return causal_cone(_point(image_size, kernel_size, i, j), kernel_size, "generation")


def inference_cone(image_size: int, kernel_size: int, i: int, j: int) -> torch.Tensor:
    """Latent positions ``(L, L)`` bool that a change of pixel ``(i, j)`` can reach.

    It holds O(1) latents per RG level, O(log L) in all (paper §3).
    """
    return causal_cone(_point(image_size, kernel_size, i, j), kernel_size, "inference")


# -------------------------------------------------------------------------- receptive fields


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _check_latents(model, latents) -> list[tuple[int, int, int]]:
    latents = [tuple(l) for l in latents]
    L, C = model.image_size, model.channels
    for l in latents:
        if len(l) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in l) or not (
            0 <= l[0] < C and 0 <= l[1] < L and 0 <= l[2] < L
        ):
            raise ValueError(
                f"each latent must be (channel, i, j) with 0 <= channel < {C} and 0 <= i, j < {L}; got {l}"
            )
    if not latents:
        raise ValueError("latents must name at least one (channel, i, j)")
    return latents


def _prior_samples(model, n_samples, z, temperature, generator):
    if z is not None:
        model._check(z, "z")
        return z
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1; got {n_samples!r}")
    return model.prior.sample(n_samples, temperature, generator=generator)


def _check_batch_size(batch_size):
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")


def _expected_jvp(model, z: torch.Tensor, tangents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``mean_s ∂G(z_s)·v_t`` for every tangent ``v_t``: ``z (S, C, L, L)``, ``tangents (T, C, L, L)``
    → ``(T, C, L, L)``, in batches of ``batch_size`` (sample, tangent) pairs.

    ``J·v`` is the gradient over ``u`` of ``(Jᵀu)·v``: two vector-Jacobian products, never the
    Jacobian. They run on the reference ops (backend ``"torch"``), which are differentiable
    twice on every device; a fused kernel's backward need not be.
    """
    S, T = z.shape[0], tangents.shape[0]
    out = torch.zeros_like(tangents)
    with use_backend("torch"), torch.enable_grad():
        for chunk in torch.arange(S * T, device=z.device).split(batch_size):
            s, t = chunk // T, chunk % T
            zs = z[s].detach().requires_grad_(True)
            x = model.inverse(zs)[0]
            u = torch.zeros_like(x, requires_grad=True)
            (vjp,) = torch.autograd.grad(x, zs, u, create_graph=True)
            (jvp,) = torch.autograd.grad(vjp, u, tangents[t])
            out.index_add_(0, t, jvp.detach())
    return out / S


def pick_latents(model, per_level: int = 16, seed: int = 0) -> list[tuple[int, int, int]]:
    """Up to ``per_level`` latents ``(channel, i, j)`` of every RG level, drawn from ``seed``:
    the same picks on every run with the same seed (the global RNG is not touched).

    Positions of one level are distinct (all of them when the level has ``<= per_level``), each
    with a random channel; the list runs from level 0 to the top, positions in row-major order
    within a level. Pass it to :func:`receptive_fields`; :func:`latent_levels` gives the levels.
    """
    if not isinstance(per_level, int) or isinstance(per_level, bool) or per_level < 1:
        raise ValueError(f"per_level must be an int >= 1; got {per_level!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int; got {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    levels = latent_levels(model.image_size, model.kernel_size)
    picks = []
    for h in range(model.n_levels):
        positions = (levels == h).nonzero()
        chosen = torch.randperm(len(positions), generator=generator)[:per_level].sort().values
        channels = torch.randint(model.channels, (len(chosen),), generator=generator)
        picks += [(int(c), int(positions[p, 0]), int(positions[p, 1])) for c, p in zip(channels, chosen)]
    return picks


def receptive_fields(model, latents, n_samples: int = 64, *, z=None, temperature=None,
                     batch_size: int = 64, generator=None) -> torch.Tensor:
    """Receptive fields ``RF_l = E_{z~p_Z} ∂G(z)/∂z_l`` (paper Eq. 8) of several latents.

    ``latents``: ``(channel, i, j)`` triples, ``T`` of them. The expectation is the mean over
    ``n_samples`` draws from the model's prior at ``temperature`` (default: the model's own),
    or over the given samples ``z (S, C, L, L)``. Returns ``(T, C, L, L)``; ``RF_l`` is zero
    outside the generation cone of ``l``. Cost: ``T·S`` Jacobian-vector products (each one
    pass of ``G`` and two reverse passes), ``batch_size`` at a time.
    """
    latents = _check_latents(model, latents)
    _check_batch_size(batch_size)
    z = _prior_samples(model, n_samples, z, temperature, generator)
    tangents = z.new_zeros(len(latents), *z.shape[1:])
    for t, (c, i, j) in enumerate(latents):
        tangents[t, c, i, j] = 1
    return _expected_jvp(model, z, tangents, batch_size)


def receptive_field(model, i: int, j: int, channel: int = 0, n_samples: int = 64, **kwargs) -> torch.Tensor:
    """Receptive field ``(C, L, L)`` of the latent ``(channel, i, j)``; see :func:`receptive_fields`."""
    return receptive_fields(model, [(channel, i, j)], n_samples, **kwargs)[0]


def _disjoint_groups(cones: torch.Tensor, order: torch.Tensor) -> list[list[int]]:
    """Greedy partition of positions into groups whose cones ``(N, L, L)`` are pairwise
    disjoint, visiting positions in ``order`` (widest cones first packs best)."""
    groups: list[list[int]] = []
    union = cones.new_zeros(0, cones[0].numel())
    flat = cones.flatten(1)
    for p in order.tolist():
        free = (~(union & flat[p]).any(dim=1)).nonzero()
        if len(free):
            g = int(free[0])
            groups[g].append(p)
            union[g] |= flat[p]
        else:
            groups.append([p])
            union = torch.cat([union, flat[p][None]])
    return groups


def receptive_field_strengths(model, n_samples: int = 16, *, z=None, temperature=None,
                              batch_size: int = 64, generator=None) -> torch.Tensor:
    """Strength ``‖RF_l‖₂`` (over channels and pixels) of every latent, ``(C, L, L)``: the
    statistics of paper Fig. 3(c).

    Latents whose generation cones are disjoint share one Jacobian-vector product (their
    receptive fields have disjoint supports, so each is read back from the sum on its own
    cone): ``C·G`` products per sample instead of ``C·L²``, with ``G`` = 268 groups of
    positions instead of 1024 at ``L = 32, k = 4`` (498 instead of 4096 at ``L = 64``). The
    cones of all positions are held at once, ``L⁴`` bytes (16 MiB at ``L = 64``).
    """
    _check_batch_size(batch_size)
    z = _prior_samples(model, n_samples, z, temperature, generator)
    L, C, k = model.image_size, model.channels, model.kernel_size
    eye = torch.eye(L * L, dtype=torch.bool, device=z.device).view(L * L, L, L)
    cones = causal_cone(eye, k, "generation")  # (L², L, L)
    levels = latent_levels(L, k).flatten()
    groups = _disjoint_groups(cones, torch.argsort(levels, descending=True, stable=True))
    tangents = z.new_zeros(len(groups), C, C, L * L)
    for g, members in enumerate(groups):
        tangents[g, torch.arange(C), torch.arange(C), torch.tensor(members)[:, None]] = 1
    sums = _expected_jvp(model, z, tangents.view(-1, C, L, L), batch_size).view(len(groups), C, C, L * L)
    strengths = z.new_empty(C, L * L)
    for g, members in enumerate(groups):
        for p in members:
            strengths[:, p] = (sums[g] * cones[p].flatten()).flatten(1).norm(dim=1)
    return strengths.view(C, L, L)


def strength_statistics(strengths: torch.Tensor, kernel_size: int, threshold: float = 1.0,
                        bins: int = 20) -> list[dict]:
    """Per-level summary of receptive-field strengths ``(C, L, L)`` (paper Fig. 3(c)).

    For each RG level: the number of latents, how many have strength above ``threshold``
    (the paper calls those with strength > 1 visible), mean, median and max, and a histogram
    of ``log10`` strength (``bins`` equal bins over all levels' range).
    """
    if not isinstance(strengths, torch.Tensor) or strengths.dim() != 3 or strengths.shape[1] != strengths.shape[2]:
        raise ValueError(f"strengths must be a (C, L, L) tensor; got {_describe(strengths)}")
    levels = latent_levels(strengths.shape[-1], kernel_size).to(strengths.device).expand_as(strengths)
    logs = strengths.double().clamp_min(1e-30).log10()
    lo, hi = float(logs.min()), float(logs.max())
    if hi <= lo:
        hi = lo + 1.0
    stats = []
    for h in range(int(levels.max()) + 1):
        values = strengths[levels == h].double()
        counts = torch.histc(logs[levels == h], bins=bins, min=lo, max=hi)
        stats.append({
            "level": h,
            "count": values.numel(),
            "above_threshold": int((values > threshold).sum()),
            "mean": float(values.mean()),
            "median": float(values.median()),
            "max": float(values.max()),
            "log10_bin_edges": torch.linspace(lo, hi, bins + 1).tolist(),
            "histogram": [int(c) for c in counts.tolist()],
        })
    return stats


# ------------------------------------------------------------------- mixing, walks, inpainting


def mix(model, x_a: torch.Tensor, x_b: torch.Tensor, lam: int) -> torch.Tensor:
    """Hyperbolic mixing (paper Eq. 9): ``z⁽ʰ⁾ = z_A⁽ʰ⁾`` for levels ``h >= lam``, ``z_B⁽ʰ⁾``
    below, with ``z = R(x)``; returns ``G(z)`` ``(B, C, L, L)``.

    ``lam = 0`` takes every level from A (returns ``G(R(x_a))``), ``lam = n_levels`` every
    level from B; in between, A gives the large scales and B the fine ones.
    """
    model._check(x_a, "x_a")
    model._check(x_b, "x_b")
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape; got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    if not isinstance(lam, int) or isinstance(lam, bool) or not 0 <= lam <= model.n_levels:
        raise ValueError(f"lam must be an int in [0, {model.n_levels}] (the model's RG levels); got {lam!r}")
    with torch.no_grad():
        z_a, z_b = model(x_a)[0], model(x_b)[0]
        from_a = model.prior.levels >= lam
        return model.inverse(torch.where(from_a, z_a, z_b))[0]


def walk_values(model, i: int, j: int, n_frames: int = 7, spread: float = 4.0, temperature=None) -> torch.Tensor:
    """The default values of a :func:`walk` of the latent at ``(i, j)``: ``n_frames`` evenly
    spaced from ``-spread·σ`` to ``+spread·σ`` (``(n_frames,)``, float64), where ``σ`` is the
    prior's standard deviation at the latent's level — that level's temperature ``T`` (both
    priors have unit variance at ``T = 1``; ``temperature`` overrides the model's own).

    ``±4σ`` spans the prior's bulk (a unit Laplace exceeds it with probability
    ``exp(-4√2) ≈ 0.35 %``) and, with an odd ``n_frames``, puts the prior's mode 0 in the middle
    frame. On a small MSDS1 model (2 layers per block, 3.4 bits/dim) a top-level latent moved
    pixels by at most 2-4/255 over the paper's ``0 … 1.5``, and by 10-25/255 over ``±4σ``.
    """
    _check_latents(model, [(0, i, j)])
    if not isinstance(n_frames, int) or isinstance(n_frames, bool) or n_frames < 2:
        raise ValueError(f"n_frames must be an int >= 2; got {n_frames!r}")
    if not spread > 0:
        raise ValueError(f"spread must be > 0 (in prior standard deviations); got {spread!r}")
    level = int(latent_levels(model.image_size, model.kernel_size)[i, j])
    temperatures = model.prior.temperature if temperature is None else (
        model.prior._scales(temperature) / model.prior._scales(1.0)).tolist()
    sigma = float(temperatures[level])
    steps = torch.arange(n_frames, dtype=torch.float64) - (n_frames - 1) / 2  # symmetric: the middle is exactly 0
    return steps * (2 * spread * sigma / (n_frames - 1))


def walk(model, x: torch.Tensor, i: int, j: int, channel: int, values=None) -> torch.Tensor:
    """Vary one latent (paper Fig. 4): ``x (C, L, L)`` → frames ``(V, C, L, L)``, frame ``v``
    is ``G(z)`` with ``z = R(x)`` and ``z[channel, i, j] = values[v]``.

    ``values`` (``V`` numbers) default to :func:`walk_values` — 7 values over ``±4`` prior
    standard deviations, the mode 0 in the middle. The latent's own value is ``R(x)[channel,
    i, j]``.
    """
    _check_latents(model, [(channel, i, j)])
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be one image (C, L, L); got {_describe(x)}")
    if values is None:
        values = walk_values(model, i, j)
    values = torch.as_tensor(values, dtype=x.dtype, device=x.device).flatten()
    if values.numel() == 0:
        raise ValueError("values must hold at least one latent value")
    model._check(x[None], "x[None]")
    with torch.no_grad():
        z = model(x[None])[0].repeat(values.numel(), 1, 1, 1)
        z[:, channel, i, j] = values
        return model.inverse(z)[0]


def inpaint(model, x: torch.Tensor, mask: torch.Tensor, *, n_starts: int = 200, steps: int = 300,
            lr: float = 0.05, restrict_to_cone: bool = True, noise_std: float = 1.0,
            temperature=None, batch_size: int = 64, generator=None):
    """Inpaint the region ``mask`` of images ``x (B, C, L, L)`` (paper Appendix D).

    The region is filled with Gaussian noise (std ``noise_std``) and encoded, ``z₀ = R(x̃)``.
    The varied latents are those in the inference cone of the region (every channel), or all
    latents with ``restrict_to_cone=False``; latents outside the cone do not depend on the
    region, so they stay at ``z₀``. Candidate fill ``x(z) = mask ? G(z) : x``, scored by
    ``log p(x(z))``. Start from the best of ``z₀`` and ``n_starts`` prior draws (at
    ``temperature``) for the varied latents, then run ``steps`` of Adam (``lr``) on them.

    ``mask``: ``(L, L)`` bool, True where pixels are missing. Returns ``(image (B, C, L, L),
    n_varied)``: the image equals ``x`` outside the mask, and ``n_varied`` is the number of
    latents varied per image (``C·|cone|``; ``C·L²`` without the restriction).
    """
    model._check(x, "x")
    L = model.image_size
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (L, L):
        raise ValueError(f"mask must be a ({L}, {L}) bool tensor (True = missing); got {_describe(mask)}")
    if not mask.any():
        raise ValueError("mask is empty: mark at least one missing pixel")
    for name, v, lo in (("n_starts", n_starts, 0), ("steps", steps, 0), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    mask = mask.to(x.device)
    B, C = x.shape[:2]
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    corrupted = torch.where(mask, noise_std * noise, x)
    vary = causal_cone(mask, model.kernel_size, "inference") if restrict_to_cone else torch.ones_like(mask)

    def filled(z):
        return torch.where(mask, model.inverse(z)[0], x)

    with torch.no_grad():
        z0 = model(corrupted)[0]
        starts = model.prior.sample(B * n_starts, temperature, generator=generator)
        candidates = torch.cat([z0[:, None], starts.view(B, n_starts, C, L, L)], dim=1)
        candidates = torch.where(vary, candidates, z0[:, None])  # (B, 1 + n_starts, C, L, L)
        flat = candidates.flatten(0, 1)
        images = x.repeat_interleave(n_starts + 1, dim=0)
        scores = torch.cat([
            model.log_prob(torch.where(mask, model.inverse(zc)[0], xc))
            for zc, xc in zip(flat.split(batch_size), images.split(batch_size))
        ]).view(B, n_starts + 1)
        best = candidates[torch.arange(B), scores.argmax(dim=1)]
    z = best.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        # gradients w.r.t. the latents only: the model's own parameters stay untouched
        loss = -model.log_prob(filled(torch.where(vary, z, z0))).sum()
        (grad,) = torch.autograd.grad(loss, [z])
        z.grad = grad
        optimizer.step()
    with torch.no_grad():
        image = filled(torch.where(vary, z, z0))
    return image, int(vary.sum()) * C


# ------------------------------------------------------------------------- latent correlation


class LatentCorrelation(NamedTuple):
    """Result of :func:`latent_correlation`."""

    matrix: torch.Tensor  # (D, D) float64 Pearson correlations; NaN in rows of constant latents
    latents: list  # the (channel, i, j) of each row/column, channel-major, then i, then j
    level: int  # the RG level
    count: int  # the number of images the statistics ran over


def _batches(data):
    """A tensor ``(N, C, L, L)`` as one batch, or the tensors of an iterable (a DataLoader's
    ``(images, labels)`` pairs give their first element)."""
    if isinstance(data, torch.Tensor):
        yield data
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"images_or_latents must be a (N, C, L, L) tensor or an iterable of such batches "
            f"(e.g. a DataLoader); got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"each batch must be a (B, C, L, L) tensor (or a tuple starting with one); "
                            f"got {type(batch).__name__}")
        yield batch


def latent_correlation(model, images_or_latents, level: int, *, are_latents: bool = False,
                       and_above: bool = False, batch_size: int = 256) -> LatentCorrelation:
    """Correlation matrix of the latents at RG level ``level`` over a dataset: the authors'
    measure of disentanglement (``test_latent_corr.py``). A flow that factorises the data
    well gives latents that are uncorrelated (the prior is factorised), so the off-diagonal
    entries measure how much dependence is left between the latents of one scale.

    ``images_or_latents``: images ``(N, C, L, L)`` in logit space (encoded with ``z = R(x)``,
    ``batch_size`` at a time, without gradients), or latents when ``are_latents=True``; or an
    iterable of such batches (e.g. a ``DataLoader``; ``(images, labels)`` pairs are read as
    images). The latents taken are every channel at the positions of level ``level``
    (:func:`latent_levels` ``== level``), ``D = C·P`` of them; with ``and_above=True`` the
    positions of level ``>= level``, i.e. ``z[:, :, ::2**level, ::2**level]`` — what the
    authors' script takes (``z[:, :, ::8, ::8]``: the top level at ``L = 32, k = 4``).

    Returns :class:`LatentCorrelation` ``(matrix (D, D) float64, latents, level, count)``:
    ``matrix[a, b] = cov(z_a, z_b) / (σ_a σ_b)`` over the ``N >= 2`` images (unbiased
    covariance; the sums run in float64 with a batch-wise update of means and co-moments, so
    the order and size of the batches do not matter), with ``latents[a] = (channel, i, j)``
    channel-major, then ``i``, then ``j`` (the order of ``z[:, :, rows, cols].flatten(1)``).
    A latent that is constant over the data has no correlation: its row and column are NaN.
    """
    n_levels = model.n_levels
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < n_levels:
        raise ValueError(f"level must be an int in [0, {n_levels}) (the model's RG levels); got {level!r}")
    _check_batch_size(batch_size)
    levels = latent_levels(model.image_size, model.kernel_size)
    where = (levels >= level) if and_above else (levels == level)
    rows, cols = where.nonzero(as_tuple=True)
    latents = [(c, int(i), int(j)) for c in range(model.channels) for i, j in zip(rows, cols)]
    count, mean, comoment = 0, None, None
    for batch in _batches(images_or_latents):
        model._check(batch, "latents" if are_latents else "images")
        for chunk in batch.split(batch_size):
            if not are_latents:
                with torch.no_grad():
                    chunk = model(chunk)[0]
            z = chunk[:, :, rows.to(chunk.device), cols.to(chunk.device)].flatten(1).double()
            n = z.shape[0]
            if n == 0:
                continue
            chunk_mean = z.mean(dim=0)
            centred = z - chunk_mean
            chunk_comoment = centred.T @ centred
            if count == 0:
                count, mean, comoment = n, chunk_mean, chunk_comoment
                continue
            # Chan et al.'s pairwise update: exact for any split of the data into batches
            delta = chunk_mean - mean
            total = count + n
            comoment = comoment + chunk_comoment + torch.outer(delta, delta) * (count * n / total)
            mean = mean + delta * (n / total)
            count = total
    if count < 2:
        raise ValueError(f"latent_correlation needs at least 2 images; got {count}")
    comoment = (comoment + comoment.T) / 2  # a BLAS product need not be exactly symmetric
    std = comoment.diagonal().sqrt()
    std = torch.where(std > 0, std, torch.full_like(std, float("nan")))
    matrix = comoment / (std[:, None] * std[None, :])  # one product: exactly symmetric
    matrix.diagonal().copy_(torch.where(std.isnan(), std, torch.ones_like(std)))
    return LatentCorrelation(matrix.clamp(-1, 1), latents, level, count)
