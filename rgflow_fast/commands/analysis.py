"""``rgflow-fast receptive-fields``, ``mix``, ``inpaint`` and ``walk``: the paper's analyses
(:mod:`rgflow_fast.analysis`) of a trained checkpoint, written as PNGs."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import analysis, backends
from ..data import require_torchvision
from ..geometry import latent_levels
from ..training import RunError
from ..training.outputs import load_for_command, save_grid, save_pixels
from ..training.progress import Progress
from ..transforms import logit_transform
from . import add_system_flags, guard, setup


def _load(args):
    """The checkpoint's model on ``--device``, with torch seeded by ``--seed``."""
    device = setup(args)
    model = load_for_command(args.checkpoint, device)
    torch.manual_seed(args.seed)
    return model


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
    model = _load(args)
    L, C, k = model.image_size, model.channels, model.kernel_size
    out = Path(args.out)
    levels = latent_levels(L, k)
    out.mkdir(parents=True, exist_ok=True)
    with backends.use_backend(args.backend), Progress(model.n_levels, "receptive fields", unit="level") as bar:
        for h in range(model.n_levels):
            positions = (levels == h).nonzero()[torch.randperm(int((levels == h).sum()))[: args.per_level]]
            picks = [(int(torch.randint(C, ())), int(i), int(j)) for i, j in positions]
            fields = _analyse(analysis.receptive_fields, model, picks, args.samples, temperature=args.temperature,
                              batch_size=args.batch_size)
            # as in paper Figs. 10-13 each field is scaled to unit size, shown as 0.5 + 0.5·RF/max|RF|
            tiles = fields / fields.flatten(1).abs().amax(dim=1).clamp_min(1e-30)[:, None, None, None]
            path = out / f"receptive_fields_level{h}.png"
            save_pixels(path, 0.5 + 0.5 * tiles, padding=1)
            bar.update()
            bar.write(f"level {h}: {len(tiles)} receptive fields -> {path}")
    if args.strengths:
        with backends.use_backend(args.backend):
            strengths = _analyse(analysis.receptive_field_strengths, model, args.samples,
                                 temperature=args.temperature, batch_size=args.batch_size)
        stats = analysis.strength_statistics(strengths, k)
        (out / "strengths.json").write_text(json.dumps(stats, indent=1))
        for s in stats:
            print(f"level {s['level']}: {s['count']} latents, {s['above_threshold']} with strength > 1, "
                  f"median {s['median']:.3g}, max {s['max']:.3g}")
    return 0


def _mix(args) -> int:
    model = _load(args)
    x_a, x_b = (_read_image(p, model)[None] for p in (args.image_a, args.image_b))
    with backends.use_backend(args.backend), torch.no_grad():
        frames = torch.cat([_analyse(analysis.mix, model, x_a, x_b, lam) for lam in range(model.n_levels + 1)])
    path = save_grid(args.out, frames, nrow=len(frames), padding=1)
    print(f"lambda = 0..{model.n_levels} (0: all levels from A, {model.n_levels}: all from B) -> {path}")
    return 0


def _inpaint(args) -> int:
    model = _load(args)
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
    shown = torch.where(mask.to(x.device), x.new_full((), 10.0), x)  # region shown white
    path = save_grid(args.out, torch.cat([x, shown, image]), nrow=3, padding=1)
    print(f"varied {n_varied} of {model.num_dims} latents -> {path} (original, region, inpainted)")
    return 0


def _walk(args) -> int:
    model = _load(args)
    c, i, j = args.latent
    L, C = model.image_size, model.channels
    if not (0 <= c < C and 0 <= i < L and 0 <= j < L):
        raise RunError(f"--latent {c} {i} {j} is outside the model's latents: channel in 0..{C - 1}, "
                       f"i and j in 0..{L - 1}")
    if args.frames < 1:
        raise RunError(f"--frames must be >= 1; got {args.frames}")
    with backends.use_backend(args.backend):
        x = _read_image(args.image, model) if args.image else model.sample(1, args.temperature)[0]
        values = torch.linspace(args.values[0], args.values[1], args.frames)
        frames = _analyse(analysis.walk, model, x, i, j, c, values)
    level = int(latent_levels(L, model.kernel_size)[i, j])
    path = save_grid(args.out, frames, nrow=args.frames, padding=1)
    print(f"latent (channel {c}, {i}, {j}), level {level}: {args.frames} frames -> {path}")
    return 0


def _common(p):
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by rgflow-fast train")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_system_flags(p)
    return p


def add_commands(subparsers) -> None:
    """Add ``receptive-fields``, ``mix``, ``inpaint`` and ``walk``."""
    p = _common(subparsers.add_parser("receptive-fields", help="receptive fields per level (paper Eq. 8, Figs. 10-13)"))
    p.add_argument("--out", required=True, help="folder for receptive_fields_level{h}.png (and strengths.json)")
    p.add_argument("--per-level", type=int, default=16, help="latents drawn at random per level")
    p.add_argument("--samples", type=int, default=64, help="prior samples in the expectation")
    p.add_argument("--temperature", type=float, default=None, help="prior temperature (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64, help="Jacobian-vector products per pass")
    p.add_argument("--strengths", action="store_true",
                   help="also write strengths.json: strength statistics of all latents (Fig. 3(c))")
    p.set_defaults(func=guard(_receptive_fields, "receptive-fields"))

    p = _common(subparsers.add_parser("mix", help="hyperbolic mixing of two images (paper Eq. 9, Fig. 5)"))
    p.add_argument("image_a", help="PNG giving the large scales")
    p.add_argument("image_b", help="PNG giving the fine scales")
    p.add_argument("--out", required=True, help="PNG strip: lambda = 0 (all A) ... n_levels (all B)")
    p.set_defaults(func=guard(_mix, "mix"))

    p = _common(subparsers.add_parser("inpaint", help="inpaint a box of an image (paper Appendix D)"))
    p.add_argument("image", help="PNG to inpaint")
    p.add_argument("--box", type=int, nargs=4, required=True, metavar=("TOP", "LEFT", "HEIGHT", "WIDTH"),
                   help="the missing region")
    p.add_argument("--out", required=True, help="PNG strip: original, region, inpainted")
    p.add_argument("--all-latents", action="store_true", help="vary all latents, not only the inference cone")
    p.add_argument("--starts", type=int, default=200, help="random starts (the best one is optimised)")
    p.add_argument("--steps", type=int, default=300, help="Adam steps")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=64, help="starts scored per pass")
    p.set_defaults(func=guard(_inpaint, "inpaint"))

    p = _common(subparsers.add_parser("walk", help="vary one latent (paper Fig. 4)"))
    p.add_argument("image", nargs="?", default=None, help="PNG to start from (default: a sample)")
    p.add_argument("--latent", type=int, nargs=3, required=True, metavar=("CHANNEL", "I", "J"))
    p.add_argument("--values", type=float, nargs=2, default=(0.0, 1.5), metavar=("FROM", "TO"),
                   help="range of the latent's value (paper: 0 to 1.5, 0 to 6 at level 0)")
    p.add_argument("--frames", type=int, default=7, help="frames in the strip")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature when no image is given")
    p.add_argument("--out", required=True, help="PNG strip of the frames")
    p.set_defaults(func=guard(_walk, "walk"))
