"""Self-explaining PNG figures of the analyses in :mod:`rgflow_fast.analysis`.

Every panel says what it shows (which latent, its RG level and value, λ, which image), every
colour scale has a labelled colour bar, and each figure has a title naming the analysis.
Images are taken in the flow's logit space, as the analysis functions return them, and shown
as pixels with :func:`rgflow_fast.transforms.to_pixels`; image panels need 1 (grey) or 3
(RGB) channels. Drawing uses matplotlib's ``Figure`` with the Agg canvas directly: no pyplot
state, no change to the user's matplotlib backend (``pip install matplotlib``).

Each function writes one PNG and returns its path (parent folders are created)::

    receptive_fields_figure(fields, latents, path, *, kernel_size, n_samples=None, ncols=8)
        fields (T, C, L, L) from analysis.receptive_fields(model, latents, ...); latents the
        T (channel, i, j) it was given (e.g. analysis.pick_latents(model)). One row group per
        RG level; each tile titled "L<level> (i,j) c<channel>" with its max|RF|, the latent's
        own pixel outlined; colour bar: RF / max|RF| of the tile.
    walk_figure(frames, values, path, *, latent, kernel_size, original=None, original_value=None)
        frames (V, C, L, L) from analysis.walk(model, x, i, j, channel, values); values (V,);
        latent = (channel, i, j). Each frame titled with the latent's value; with the
        original image x (C, L, L) a first panel shows it (and its own value) and a second row
        shows each frame's change from it in 1/255 units, with a colour bar.
    mix_figure(frames, path, *, image_a=None, image_b=None)
        frames (n_levels + 1, C, L, L): analysis.mix(model, x_a, x_b, lam)[0] for lam = 0 ..
        n_levels; each titled "λ = lam" and which levels come from A and B; A and B
        (C, L, L) shown at the ends when given.
    inpaint_figure(original, mask, result, path, *, n_varied=None, num_dims=None)
        original, result (B, C, L, L) or (C, L, L); mask (L, L) bool, True = missing. One row
        per image: original / missing region (red) / inpainted (region outlined).
    correlation_figure(correlation, path, *, latents=None, level=None, count=None)
        correlation: an analysis.LatentCorrelation, or a (D, D) matrix with latents, level and
        count given. Heatmap in [-1, 1] with a colour bar, axes labelled by latent
        (channel, i, j), NaN (constant latents) in grey; the title gives the mean
        |off-diagonal| beside what independent latents would give over that many images.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .geometry import latent_levels
from .transforms import to_pixels

__all__ = [
    "receptive_fields_figure",
    "walk_figure",
    "mix_figure",
    "inpaint_figure",
    "correlation_figure",
]

_TILE = 1.25  # inches per image panel
_DPI = 120
_TITLE = 7.5  # font sizes
_SUPTITLE = 9.5


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("rgflow_fast.figures draws with matplotlib, which is not installed: "
                          "pip install matplotlib") from exc
    return Figure


def _figure(width, height):
    return _matplotlib()(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", facecolor="white")
    return path


def _images(x, name, ndim=4):
    """Logit-space images as float32 CPU pixels in [0, 1], ``(N, C, L, L)``."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, ndim) or x.shape[-1] != x.shape[-2]:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be logit-space images (N, C, L, L) or one image (C, L, L); got {got}")
    x = x.detach().float().cpu()
    x = x[None] if x.dim() == 3 else x
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{name} has {x.shape[1]} channels; image panels show 1 (grey) or 3 (RGB) channels: "
                         f"pass a 1- or 3-channel selection, e.g. {name}[:, :3]")
    return to_pixels(x)


def _show(ax, pixels, title=None):
    """One image ``(C, L, L)`` in [0, 1] on ``ax``, without ticks."""
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(pixels.permute(1, 2, 0).numpy(), interpolation="nearest")
    _bare(ax, title)


def _bare(ax, title=None):
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=_TITLE)


def _outline(ax, mask, color):
    """Outline the ``True`` pixels of ``mask (L, L)`` on ``ax``, pixel edges exact."""
    m = mask.bool().cpu()
    L = m.shape[-1]
    padded = torch.zeros(L + 2, L + 2, dtype=torch.bool)
    padded[1:-1, 1:-1] = m
    for i, j in m.nonzero().tolist():
        p, q = i + 1, j + 1
        for di, dj, xs, ys in ((-1, 0, (j - .5, j + .5), (i - .5, i - .5)), (1, 0, (j - .5, j + .5), (i + .5, i + .5)),
                               (0, -1, (j - .5, j - .5), (i - .5, i + .5)), (0, 1, (j + .5, j + .5), (i - .5, i + .5))):
            if not padded[p + di, q + dj]:
                ax.plot(xs, ys, color=color, linewidth=1.0, solid_capstyle="butt")
    ax.set_xlim(-0.5, L - 0.5)
    ax.set_ylim(L - 0.5, -0.5)


def _colorbar(fig, axes, cmap, vmin, vmax, label):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=axes, shrink=0.8, pad=0.02, aspect=25)
    bar.set_label(label, fontsize=_TITLE)
    bar.ax.tick_params(labelsize=_TITLE)
    return bar


def _latent_list(latents, T):
    latents = [tuple(int(v) for v in l) for l in latents]
    if len(latents) != T or any(len(l) != 3 for l in latents):
        raise ValueError(f"latents must be the {T} (channel, i, j) triples the fields were computed for; got {len(latents)}")
    return latents


# --------------------------------------------------------------------------- receptive fields


def receptive_fields_figure(fields: torch.Tensor, latents, path, *, kernel_size: int, n_samples=None,
                            ncols: int = 8, title=None) -> Path:
    """Receptive fields ``RF_l = E ∂G(z)/∂z_l`` (paper Eq. 8) as labelled tiles.

    ``fields (T, C, L, L)`` as :func:`rgflow_fast.analysis.receptive_fields` returns them for
    ``latents`` (``T`` triples ``(channel, i, j)``); ``kernel_size`` gives the RG levels.
    Tiles are grouped by level (one row group per level, ``ncols`` tiles a row), each scaled
    to its own maximum as in paper Figs. 10-13 — RGB fields as ``0.5 + 0.5·RF/max|RF|`` per
    colour channel (grey = 0), 1-channel fields on a red-blue scale — and titled with the
    latent's level, position, channel and ``max|RF|``; the latent's own pixel is outlined.
    ``n_samples`` (the prior samples in the mean) goes into the title when given.
    """
    if not isinstance(fields, torch.Tensor) or fields.dim() != 4 or fields.shape[-1] != fields.shape[-2]:
        raise ValueError(f"fields must be (T, C, L, L) from analysis.receptive_fields; got "
                         f"{tuple(fields.shape) if isinstance(fields, torch.Tensor) else type(fields).__name__}")
    T, C, L, _ = fields.shape
    latents = _latent_list(latents, T)
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be an int >= 1; got {ncols!r}")
    levels = latent_levels(L, kernel_size)
    fields = fields.detach().double().cpu()
    scale = fields.flatten(1).abs().amax(dim=1)
    unit = fields / scale.clamp_min(1e-300)[:, None, None, None]
    by_level = {}
    for t, (c, i, j) in enumerate(latents):
        by_level.setdefault(int(levels[i, j]), []).append(t)
    rows = [(h, members[r : r + ncols]) for h, members in sorted(by_level.items())
            for r in range(0, len(members), ncols)]
    cols = min(ncols, max(len(m) for _, m in rows))
    fig = _figure(_TILE * cols + 1.4, _TILE * 1.22 * len(rows) + 0.7)
    grid = fig.add_gridspec(len(rows), cols)
    axes = []
    rgb = C == 3
    for r, (h, members) in enumerate(rows):
        for col in range(cols):
            ax = fig.add_subplot(grid[r, col])
            axes.append(ax)
            if col >= len(members):
                ax.axis("off")
                continue
            t = members[col]
            c, i, j = latents[t]
            if rgb:
                ax.imshow((0.5 + 0.5 * unit[t]).clamp(0, 1).permute(1, 2, 0).float().numpy(), interpolation="nearest")
            else:  # one channel, or the latent's own channel of a C-channel model
                ax.imshow(unit[t, 0 if C == 1 else c].float().numpy(), cmap="RdBu_r", vmin=-1, vmax=1,
                          interpolation="nearest")
            _bare(ax, f"L{h} ({i},{j}) c{c}\nmax|RF| {float(scale[t]):.2g}")
            point = torch.zeros(L, L, dtype=torch.bool)
            point[i, j] = True
            _outline(ax, point, "lime")
            if col == 0:
                ax.set_ylabel(f"level {h}", fontsize=_SUPTITLE)
    if rgb:
        label = "RF / max|RF| of the tile\n(each colour channel; grey = 0)"
        _colorbar(fig, axes, "gray", -1, 1, label)
    else:
        shown = "" if C == 1 else " (the latent's own channel)"
        _colorbar(fig, axes, "RdBu_r", -1, 1, f"RF / max|RF| of the tile{shown}")
    samples = f", mean over {n_samples} prior samples" if n_samples else ""
    fig.suptitle(title or f"Receptive fields ∂G(z)/∂z_l (paper Eq. 8){samples}\n"
                          f"tile: latent l = L<level> (i,j) c<channel>, its pixel outlined in green",
                 fontsize=_SUPTITLE)
    return _save(fig, path)


# ------------------------------------------------------------------------------------ walks


def walk_figure(frames: torch.Tensor, values, path, *, latent, kernel_size: int, original=None,
                original_value=None, title=None) -> Path:
    """A latent walk (paper Fig. 4) with each frame's latent value.

    ``frames (V, C, L, L)`` from :func:`rgflow_fast.analysis.walk` with ``values (V,)``;
    ``latent = (channel, i, j)``; ``kernel_size`` gives its RG level. With ``original``
    (the walked image ``x (C, L, L)``) the strip starts with it (titled with
    ``original_value``, the latent's own value ``R(x)[channel, i, j]``, when given) and a
    second row shows ``max over channels |frame − original|`` in 1/255 units on one colour
    scale, so a small change stays visible.
    """
    pixels = _images(frames, "frames")
    V, C, L, _ = pixels.shape
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() != V:
        raise ValueError(f"values must hold one value per frame ({V}); got {values.numel()}")
    c, i, j = (int(v) for v in latent)
    level = int(latent_levels(L, kernel_size)[i, j])
    base = None if original is None else _images(original, "original")[0]
    n = V + (base is not None)
    fig = _figure(_TILE * n + (1.2 if base is not None else 0.3), _TILE * (2.35 if base is not None else 1.3) + 0.5)
    grid = fig.add_gridspec(2 if base is not None else 1, n)
    if base is not None:
        own = "" if original_value is None else f"\nz = {float(original_value):+.2f}"
        _show(fig.add_subplot(grid[0, 0]), base, f"original{own}")
        note = fig.add_subplot(grid[1, 0])
        note.axis("off")
        note.text(0.5, 0.5, "change from\nthe original\n(1/255 units)", ha="center", va="center",
                  fontsize=_TITLE, transform=note.transAxes)
    for v in range(V):
        _show(fig.add_subplot(grid[0, v + (base is not None)]), pixels[v], f"z = {float(values[v]):+.2f}")
    if base is not None:
        change = 255 * (pixels - base).abs().amax(dim=1)  # (V, L, L)
        top = max(1.0, float(change.max()))
        axes = []
        for v in range(V):
            ax = fig.add_subplot(grid[1, v + 1])
            ax.imshow(change[v].numpy(), cmap="magma", vmin=0, vmax=top, interpolation="nearest")
            _bare(ax, f"max {float(change[v].max()):.0f}")
            axes.append(ax)
        _colorbar(fig, axes, "magma", 0, top, "max over channels\n|frame − original| (/255)")
    fig.suptitle(title or f"Walk of latent (channel {c}, i={i}, j={j}), RG level {level}: "
                          f"frame = G(z) with z[{c},{i},{j}] set to the value above it",
                 fontsize=_SUPTITLE)
    return _save(fig, path)


# ----------------------------------------------------------------------------------- mixing


def mix_figure(frames: torch.Tensor, path, *, image_a=None, image_b=None, title=None) -> Path:
    """Hyperbolic mixing (paper Eq. 9) as a strip labelled with λ.

    ``frames (n_levels + 1, C, L, L)``: frame ``λ`` is ``analysis.mix(model, x_a, x_b, λ)``
    — RG levels ``h >= λ`` from A (the large scales), ``h < λ`` from B (the fine ones); so
    ``λ = 0`` is A itself and ``λ = n_levels`` is B. ``image_a``, ``image_b`` (``(C, L, L)``)
    are shown at the two ends when given.
    """
    pixels = _images(frames, "frames")
    n_levels = pixels.shape[0] - 1
    if n_levels < 1:
        raise ValueError(f"frames must hold one mix per λ = 0 .. n_levels (at least 2); got {pixels.shape[0]}")
    ends = [(_images(x, name)[0], label) for x, name, label in
            ((image_a, "image_a", "A\n(large scales)"), (image_b, "image_b", "B\n(fine scales)")) if x is not None]
    n = pixels.shape[0] + len(ends)
    fig = _figure(_TILE * n + 0.3, _TILE * 1.45 + 0.5)
    grid = fig.add_gridspec(1, n)
    col = 0
    if image_a is not None:
        _show(fig.add_subplot(grid[0, col]), *ends[0])
        col += 1
    for lam in range(n_levels + 1):
        if lam == 0:
            note = "all from A"
        elif lam == n_levels:
            note = "all from B"
        else:
            note = f"h≥{lam} A, h<{lam} B"
        _show(fig.add_subplot(grid[0, col]), pixels[lam], f"λ = {lam}\n{note}")
        col += 1
    if image_b is not None:
        _show(fig.add_subplot(grid[0, col]), *ends[-1])
    fig.suptitle(title or "Hyperbolic mixing (paper Eq. 9): RG levels h ≥ λ from A (large scales), "
                          "h < λ from B (fine scales)", fontsize=_SUPTITLE)
    return _save(fig, path)


# ------------------------------------------------------------------------------- inpainting


def inpaint_figure(original: torch.Tensor, mask: torch.Tensor, result: torch.Tensor, path, *,
                   n_varied=None, num_dims=None, title=None) -> Path:
    """Inpainting (paper Appendix D): one row per image — the original, the missing region
    (painted red on it), the inpainted image with the region outlined.

    ``original``, ``result``: ``(B, C, L, L)`` or ``(C, L, L)`` logit-space images, as
    :func:`rgflow_fast.analysis.inpaint` takes and returns them; ``mask (L, L)`` bool, True
    where pixels are missing. ``n_varied`` and ``num_dims`` (from ``inpaint`` and
    ``model.num_dims``) go into the title when given.
    """
    before, after = _images(original, "original"), _images(result, "result")
    if before.shape != after.shape:
        raise ValueError(f"original and result must have the same shape; got {tuple(before.shape)} and {tuple(after.shape)}")
    B, C, L, _ = before.shape
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (L, L):
        raise ValueError(f"mask must be an ({L}, {L}) bool tensor (True = missing); got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.cpu()
    red = torch.tensor([1.0, 0.0, 0.0] if C == 3 else [1.0])[:, None, None]
    fig = _figure(_TILE * 3 + 0.3, _TILE * 1.2 * B + 0.6)
    grid = fig.add_gridspec(B, 3)
    for b in range(B):
        _show(fig.add_subplot(grid[b, 0]), before[b], "original\n" if b == 0 else None)
        _show(fig.add_subplot(grid[b, 1]), torch.where(mask, red, before[b]),
              "missing region\n(red)" if b == 0 else None)
        ax = fig.add_subplot(grid[b, 2])
        _show(ax, after[b], "inpainted\n(region outlined)" if b == 0 else None)
        _outline(ax, mask, "red")
    varied = ""
    if n_varied is not None:
        varied = f",\nvarying {n_varied}" + (f" of {num_dims}" if num_dims is not None else "") + " latents"
    fig.suptitle(title or f"Inpainting (paper App. D):\n{int(mask.sum())} missing pixels filled\n"
                          f"by maximising log p{varied}", fontsize=_SUPTITLE)
    return _save(fig, path)


# ---------------------------------------------------------------------- latent correlation


def correlation_figure(correlation, path, *, latents=None, level=None, count=None, title=None) -> Path:
    """The correlation matrix of one RG level's latents (the authors' disentanglement measure).

    ``correlation``: an :class:`rgflow_fast.analysis.LatentCorrelation` (from
    :func:`rgflow_fast.analysis.latent_correlation`), or a ``(D, D)`` matrix with ``latents``
    (``D`` triples ``(channel, i, j)``), ``level`` and ``count`` (images) given. Entries are
    coloured on ``[-1, 1]`` (red positive, blue negative; NaN, a constant latent, grey) with a
    colour bar; rows and columns are labelled ``c<channel> (i,j)`` (every few when ``D`` is
    large). The title compares the mean ``|off-diagonal|`` with ``√(2/(π·(N−1)))``, what
    independent latents give over ``N`` images by chance.
    """
    if hasattr(correlation, "matrix"):
        matrix, latents, level, count = correlation.matrix, correlation.latents, correlation.level, correlation.count
    else:
        matrix = correlation
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError("correlation must be an analysis.LatentCorrelation or a square (D, D) matrix")
    D = matrix.shape[0]
    if latents is None or len(latents) != D:
        raise ValueError(f"latents must name the {D} rows, (channel, i, j) each; "
                         f"pass the LatentCorrelation that latent_correlation returns")
    m = matrix.detach().double().cpu()
    from matplotlib import colormaps

    cmap = colormaps["RdBu_r"].with_extremes(bad="0.6")
    side = min(9.0, max(4.0, 0.16 * D + 2.0))
    fig = _figure(side + 1.2, side + 0.6)
    ax = fig.add_subplot()
    ax.imshow(m.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, math.ceil(D / 48))
    ticks = list(range(0, D, step))
    names = [f"c{c} ({i},{j})" for c, i, j in latents]
    fontsize = 6 if D <= 48 else 5
    ax.set_xticks(ticks, [names[t] for t in ticks], rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, [names[t] for t in ticks], fontsize=fontsize)
    every = "" if step == 1 else f" (a label every {step} latents)"
    ax.set_xlabel(f"latent: channel (i, j){every}", fontsize=_TITLE + 1)
    ax.set_ylabel(f"latent: channel (i, j){every}", fontsize=_TITLE + 1)
    _colorbar(fig, [ax], cmap, -1, 1, "Pearson correlation over the images")
    off = m[~torch.eye(D, dtype=torch.bool)]
    off = off[~off.isnan()]
    stats = f"mean |off-diagonal| {float(off.abs().mean()):.3f}" if off.numel() else "no off-diagonal entries"
    if count is not None and count > 1 and off.numel():
        stats += f" (independent latents: ≈ {math.sqrt(2 / (math.pi * (count - 1))):.3f} by chance over {count} images)"
    where = f"RG level {level}" if level is not None else "one RG level"
    fig.suptitle(title or f"Correlation of the {D} latents at {where} (the authors' test_latent_corr measure)\n{stats}",
                 fontsize=_SUPTITLE)
    return _save(fig, path)
