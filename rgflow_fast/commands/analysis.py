"""``rgflow-fast receptive-fields``, ``mix``, ``inpaint``, ``walk`` and ``latent-correlation``:
the paper's analyses (:mod:`rgflow_fast.analysis`) of a trained checkpoint, drawn as labelled
figures (:mod:`rgflow_fast.figures`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import analysis, backends, figures
from ..data import load_dataset, require_torchvision
from ..geometry import latent_levels
from ..training import RunError
from ..training.outputs import read_checkpoint
from ..training.progress import Progress
from ..transforms import logit_transform, preprocess
from . import add_system_flags, guard, require_positive, setup


def _load(args):
    """``(model, payload)`` of the checkpoint, the model on ``--device`` in eval mode; torch
    seeded by ``--seed``."""
    model, payload = read_checkpoint(args.checkpoint, setup(args))
    model.check_inputs = False
    torch.manual_seed(args.seed)
    return model.eval(), payload


def _read_image(path, model) -> torch.Tensor:
    """An image file as one logit-space image ``(C, L, L)`` in the model's dtype and device
    (read with torchvision's default loader)."""
    require_torchvision()
    from PIL import UnidentifiedImageError
    from torchvision.datasets.folder import default_loader
    from torchvision.transforms.functional import pil_to_tensor

    if model.channels not in (1, 3):
        raise RunError(f"image input needs a 1- or 3-channel model; this one has {model.channels} channels")
    path = Path(path)
    if not path.is_file():
        raise RunError(f"image {path} does not exist")
    try:
        image = default_loader(str(path))  # RGB
    except (UnidentifiedImageError, OSError) as exc:
        raise RunError(f"{path} is not a readable PNG or JPEG image ({exc})") from None
    pixels = pil_to_tensor(image.convert("L") if model.channels == 1 else image)
    L = model.image_size
    if tuple(pixels.shape[1:]) != (L, L):
        raise RunError(f"{path} is {pixels.shape[2]}x{pixels.shape[1]}; the model needs {L}x{L}: resize it first")
    return logit_transform((pixels.to(model.prior.scale) / 255)[None])[0][0]


def _analyse(func, *args, **kwargs):
    """Call an analysis function; its ``ValueError`` (a bad argument) becomes a :class:`RunError`."""
    try:
        return func(*args, **kwargs)
    except ValueError as exc:
        raise RunError(str(exc)) from None


def _receptive_fields(args) -> int:
    model, _ = _load(args)
    out = Path(args.out)
    picks = _analyse(analysis.pick_latents, model, args.per_level, args.seed)
    levels = latent_levels(model.image_size, model.kernel_size)
    fields = []
    with backends.use_backend(args.backend), Progress(model.n_levels, "receptive fields", unit="level") as bar:
        for h in range(model.n_levels):
            mine = [p for p in picks if int(levels[p[1], p[2]]) == h]
            fields.append(_analyse(analysis.receptive_fields, model, mine, args.samples,
                                   temperature=args.temperature, batch_size=args.batch_size))
            bar.update()
    path = figures.receptive_fields_figure(torch.cat(fields), picks, out / "receptive_fields.png",
                                           kernel_size=model.kernel_size, n_samples=args.samples)
    print(f"{len(picks)} receptive fields ({args.per_level} per level at most) -> {path}")
    if args.strengths:
        print("computing the strengths of all latents ...", flush=True)
        with backends.use_backend(args.backend):
            strengths = _analyse(analysis.receptive_field_strengths, model, args.samples,
                                 temperature=args.temperature, batch_size=args.batch_size)
        stats = analysis.strength_statistics(strengths, model.kernel_size)
        (out / "strengths.json").write_text(json.dumps(stats, indent=1))
        for s in stats:
            print(f"level {s['level']}: {s['count']} latents, {s['above_threshold']} with strength > 1, "
                  f"median {s['median']:.3g}, max {s['max']:.3g}")
    return 0


def _mix(args) -> int:
    model, _ = _load(args)
    x_a, x_b = (_read_image(p, model)[None] for p in (args.image_a, args.image_b))
    with backends.use_backend(args.backend), torch.no_grad():
        frames = torch.cat([_analyse(analysis.mix, model, x_a, x_b, lam) for lam in range(model.n_levels + 1)])
    path = figures.mix_figure(frames, args.out, image_a=x_a[0], image_b=x_b[0])
    print(f"lambda = 0..{model.n_levels} (0: all levels from A, {model.n_levels}: all from B) -> {path}")
    return 0


def _inpaint(args) -> int:
    model, _ = _load(args)
    x = _read_image(args.image, model)[None]
    top, left, height, width = args.box
    L = model.image_size
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > L or left + width > L:
        raise RunError(f"--box {' '.join(map(str, args.box))} must lie inside the {L}x{L} image with "
                       "height, width >= 1")
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[top : top + height, left : left + width] = True
    print(f"inpainting: scoring {args.starts} random starts, then {args.steps} Adam steps ...", flush=True)
    with backends.use_backend(args.backend):
        image, n_varied = _analyse(analysis.inpaint, model, x, mask, n_starts=args.starts, steps=args.steps,
                                   lr=args.lr, restrict_to_cone=not args.all_latents, batch_size=args.batch_size)
    path = figures.inpaint_figure(x, mask, image, args.out, n_varied=n_varied, num_dims=model.num_dims)
    print(f"varied {n_varied} of {model.num_dims} latents -> {path} (original, region, inpainted)")
    return 0


def _walk(args) -> int:
    model, _ = _load(args)
    c, i, j = args.latent
    L, C = model.image_size, model.channels
    if not (0 <= c < C and 0 <= i < L and 0 <= j < L):
        raise RunError(f"--latent {c} {i} {j} is outside the model's latents: channel in 0..{C - 1}, "
                       f"i and j in 0..{L - 1}")
    if args.frames < 2:
        raise RunError(f"--frames must be >= 2; got {args.frames}")
    with backends.use_backend(args.backend), torch.no_grad():
        x = _read_image(args.image, model) if args.image else model.sample(1, args.temperature)[0]
        if args.values:
            values = torch.linspace(args.values[0], args.values[1], args.frames, dtype=torch.float64)
        else:
            values = _analyse(analysis.walk_values, model, i, j, args.frames)
        frames = _analyse(analysis.walk, model, x, i, j, c, values)
        own = float(model(x[None])[0][0, c, i, j])
    level = int(latent_levels(L, model.kernel_size)[i, j])
    path = figures.walk_figure(frames, values, args.out, latent=(c, i, j), kernel_size=model.kernel_size,
                               original=x, original_value=own)
    print(f"latent (channel {c}, {i}, {j}), level {level}, from {values[0]:.3g} to {values[-1]:.3g}: "
          f"{args.frames} frames -> {path}")
    return 0


def _test_images(args, model, saved: dict):
    """Batches of the run's test images in logit space (dequantisation noise seeded)."""
    if "dataset" not in saved:
        raise RunError(f"checkpoint {args.checkpoint} does not say its dataset (it was not written by rgflow-fast "
                       "train)")
    data = load_dataset(saved["dataset"], "test", saved.get("data_dir"), args.images, saved.get("data_seed", 0),
                        model.image_size)
    if len(data) < 2:
        raise RunError(f"latent correlations need at least 2 images; the test set has {len(data)}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    with Progress(len(data), "latent correlation", unit="image") as bar:
        for start in range(0, len(data), args.batch_size):
            x = torch.stack([data[k] for k in range(start, min(start + args.batch_size, len(data)))])
            generator = torch.Generator(device=device).manual_seed(start)
            yield preprocess(x.to(device=device, dtype=dtype) / 255, generator=generator)[0]
            bar.update(len(x))


def _latent_correlation(args) -> int:
    require_positive(args, "images", "batch_size")
    model, payload = _load(args)
    level = model.n_levels - 1 if args.level is None else args.level
    with backends.use_backend(args.backend):
        result = _analyse(analysis.latent_correlation, model, _test_images(args, model, payload.get("train", {})), level,
                          and_above=args.and_above, batch_size=args.batch_size)
    path = figures.correlation_figure(result, args.out)
    off = result.matrix[~torch.eye(len(result.matrix), dtype=torch.bool)].abs()
    print(f"level {level}: {len(result.latents)} latents over {result.count} images, mean |correlation| "
          f"off the diagonal {off.nanmean():.3f} -> {path}")
    return 0


def _common(p):
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by rgflow-fast train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_system_flags(p)
    return p


def add_commands(subparsers) -> None:
    """Add ``receptive-fields``, ``mix``, ``inpaint``, ``walk`` and ``latent-correlation``."""
    p = _common(subparsers.add_parser("receptive-fields", help="receptive fields per level (paper Eq. 8, Figs. 10-13)"))
    p.add_argument("--out", required=True, help="folder for receptive_fields.png (and strengths.json)")
    p.add_argument("--per-level", type=int, default=8, help="latents drawn (from --seed) per level")
    p.add_argument("--samples", type=int, default=64, help="prior samples in the expectation")
    p.add_argument("--temperature", type=float, default=None, help="prior temperature (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="Jacobian-vector products per pass")
    p.add_argument("--strengths", action="store_true",
                   help="also write strengths.json: strength statistics of all latents (Fig. 3(c))")
    p.set_defaults(func=guard(_receptive_fields, "receptive-fields"))

    p = _common(subparsers.add_parser("mix", help="hyperbolic mixing of two images (paper Eq. 9, Fig. 5)"))
    p.add_argument("image_a", help="PNG giving the large scales")
    p.add_argument("image_b", help="PNG giving the fine scales")
    p.add_argument("--out", required=True, help="PNG figure: lambda = 0 (all A) ... n_levels (all B)")
    p.set_defaults(func=guard(_mix, "mix"))

    p = _common(subparsers.add_parser("inpaint", help="inpaint a box of an image (paper Appendix D)"))
    p.add_argument("image", help="PNG to inpaint")
    p.add_argument("--box", type=int, nargs=4, required=True, metavar=("TOP", "LEFT", "HEIGHT", "WIDTH"),
                   help="the missing region")
    p.add_argument("--out", required=True, help="PNG figure: original, missing region, inpainted")
    p.add_argument("--all-latents", action="store_true", help="vary all latents, not only the inference cone")
    p.add_argument("--starts", type=int, default=64, help="random starts (the best one is optimised)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="starts scored per pass")
    p.set_defaults(func=guard(_inpaint, "inpaint"))

    p = _common(subparsers.add_parser("walk", help="vary one latent (paper Fig. 4)"))
    p.add_argument("image", nargs="?", default=None, help="PNG to start from (default: a sample)")
    p.add_argument("--latent", type=int, nargs=3, required=True, metavar=("CHANNEL", "I", "J"))
    p.add_argument("--values", type=float, nargs=2, default=None, metavar=("FROM", "TO"),
                   help="range of the latent's value (default: ±4 prior standard deviations of its level; "
                        "the paper's 0 to 1.5 barely shows on a small model)")
    p.add_argument("--frames", type=int, default=7, help="frames in the strip")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature when no image is given")
    p.add_argument("--out", required=True, help="PNG figure of the frames, each with its value")
    p.set_defaults(func=guard(_walk, "walk"))

    p = _common(subparsers.add_parser(
        "latent-correlation", help="correlations of one level's latents over the test set (disentanglement)"))
    p.add_argument("--level", type=int, default=None, help="RG level (default: the top one)")
    p.add_argument("--and-above", action="store_true", help="the latents of --level and every level above it")
    p.add_argument("--images", type=int, default=1000, help="test images (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="images encoded per pass")
    p.add_argument("--out", required=True, help="PNG figure of the correlation matrix")
    p.set_defaults(func=guard(_latent_correlation, "latent-correlation"))
