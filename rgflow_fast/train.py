"""``rgflow-fast train``, ``sample`` and ``eval``: train RG-Flow on images, draw samples from
a checkpoint, and measure test bits/dim.

Training is the published setup: AdamW (lr 1e-3, weight decay 5e-5), global grad-norm
clip 1, loss = negative log-likelihood in nats per dimension (data transform included, see
:mod:`rgflow_fast.transforms`); bits/dim is logged. ``torchrun --nproc_per_node=N -m
rgflow_fast train ...`` runs DistributedDataParallel (NCCL on GPUs, gloo on the CPU); the
global batch ``--batch-size`` is split over the processes, and rank 0 alone writes files.

A run folder (``--out``) holds ``config.json``, ``metrics.jsonl`` (one JSON object per
logged step: ``step``, ``epoch``, ``bpd`` (train, mean since the previous record),
``grad_norm``, ``lr``, ``time``, ``images_per_s``, and ``test_bpd`` at checkpoints),
``bpd.png`` (the curve), ``samples/step_*.png`` (mixed-temperature sample grids) and
``checkpoints/step_*.pt`` (the last ``--keep``).

Exact resumption: the data order of epoch ``e`` is a function of ``(seed, e)``
(``DistributedSampler``), and the dequantisation noise and flips of step ``s`` on rank ``r``
come from a generator seeded with ``(seed, s, r)``; a checkpoint therefore needs only the
weights, the optimizer state and the step.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import backends
from .checkpoint import atomic_write, load_checkpoint, load_model, save_checkpoint
from .data import DATASETS, DataError, UInt8Images, dataset_info, load_dataset, require_torchvision
from .model import RGFlow
from .transforms import bits_per_dim, inverse_logit_transform, preprocess

__all__ = ["PRESETS", "add_commands", "train", "evaluate", "paper_temperature", "RunError"]

# Values a preset sets; command-line flags override them.
PRESETS = {
    # a few minutes on a 2-core CPU
    "small": dict(
        dataset="msds1", train_size=20_000, test_size=1_000, kernel_size=4, n_layers=[1],
        n_res_blocks=[1], n_mlp=[1], hidden=[64], steps=500, epochs=None, batch_size=64,
        log_every=10, ckpt_every=100,
    ),
    # the paper's MSDS model: 4 layers per level, otherwise the CelebA-32 sizes
    "paper-msds": dict(
        dataset="msds1", train_size=None, test_size=None, kernel_size=4, n_layers=[4],
        n_res_blocks=[4], n_mlp=[2], hidden=[512], steps=None, epochs=500, batch_size=64,
        log_every=50, ckpt_every=2000,
    ),
    "paper-celeba": dict(
        dataset="celeba32", train_size=None, test_size=None, kernel_size=4, n_layers=[8, 6, 4, 2],
        n_res_blocks=[4], n_mlp=[2], hidden=[512], steps=None, epochs=500, batch_size=64,
        log_every=50, ckpt_every=2000,
    ),
}
# Published optimiser settings (DESIGN.md §2).
OPTIM_DEFAULTS = dict(lr=1e-3, weight_decay=5e-5, clip_grad=1.0)
# A resumed run must match its checkpoint in these (they decide the trajectory).
RESUME_KEYS = (
    "dataset", "data_seed", "image_size", "train_size", "model", "batch_size", "lr",
    "weight_decay", "clip_grad", "seed", "world_size",
)
_MODEL_FLAGS = ("kernel_size", "n_layers", "n_res_blocks", "n_mlp", "hidden", "prior")


class RunError(Exception):
    """A command cannot run as asked; the message says why and what to do."""


class NonFiniteLoss(RunError):
    pass


def paper_temperature(n_levels: int, low: float = 0.2, high: float = 0.8) -> list[float]:
    """The paper's mixed temperature: ``low`` on level 0 (finest), ``high`` on the others."""
    return [low] + [high] * (n_levels - 1)


def _temperature(values, model: RGFlow, flag: str):
    """A sampling temperature from a flag's values (default :func:`paper_temperature`),
    checked by the prior."""
    values = values or paper_temperature(model.n_levels)
    temperature = values[0] if len(values) == 1 else values
    try:
        model.prior.scale_map(temperature)
    except ValueError as exc:
        raise RunError(f"{flag}: {exc}") from exc
    return temperature


# ----------------------------------------------------------------------------- distributed


class _Dist:
    """Rank, world size and device of this process (one process when not under torchrun)."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise RunError(f"--device {device_arg} asked for CUDA but torch sees no CUDA device; use --device cpu")
        if want_cuda:
            index = local_rank if device_arg in ("auto", "cuda") else torch.device(device_arg).index
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        elif device_arg in ("auto", "cpu"):
            self.device = torch.device("cpu")
        else:
            raise RunError(f"unknown --device {device_arg!r}; use auto, cpu, cuda or cuda:N")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if want_cuda else "gloo")
        self.main = self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def check_in_sync(self, model, step: int) -> None:
        """Raise if the ranks' weights differ (a float64 checksum per rank, all-gathered)."""
        if self.world == 1:
            return
        mine = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        if any(not torch.equal(every[0], other) for other in every[1:]):
            raise RunError(
                f"the processes' weights differ at step {step} ({[t.item() for t in every]}); "
                "DistributedDataParallel lost sync, which is a bug: please report it"
            )

    def broadcast(self, obj):
        """``obj`` from rank 0 on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _step_generator(device, seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of the dequantisation noise and flips of one step on one rank."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1))
    return g


# ----------------------------------------------------------------------------------- output


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start = total, start
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, step: int, text: str, force: bool = False):
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        done = step - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * step / max(self.total, 1))
        eta_s = f"{int(eta // 60)}:{int(eta % 60):02d}" if math.isfinite(eta) else "?"
        sys.stderr.write(
            f"\r{step:>7}/{self.total} [{'=' * filled}{' ' * (width - filled)}] {text} "
            f"{rate:.2f} it/s eta {eta_s}\x1b[K"
        )
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def plot_curve(path, train: list[tuple[int, float]], test: list[tuple[int, float]]) -> None:
    """Draw bits/dim against step (train as a line, test as dots) into a PNG with Pillow."""
    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 640, 400, 64, 16, 28, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    points = train + test
    draw.text((left, 8), "bits/dim (train: blue line, test: red dots)", fill="black")
    if points:
        x_max = max(max(s for s, _ in points), 1)
        values = [v for _, v in points]
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 1e-3) * 0.05
        lo, hi = lo - pad, hi + pad

        def xy(step, value):
            return (left + (w - left - right) * step / x_max, top + (h - top - bottom) * (hi - value) / (hi - lo))

        for i in range(5):
            value = lo + (hi - lo) * i / 4
            y = xy(0, value)[1]
            draw.line([(left - 4, y), (w - right, y)], fill=(225, 225, 225))
            draw.text((4, y - 6), f"{value:.3f}", fill="black")
            step = x_max * i / 4
            x = xy(step, lo)[0]
            draw.text((x - 12, h - bottom + 6), f"{step:.0f}", fill="black")
        draw.text(((w - left) // 2 + left - 12, h - 16), "step", fill="black")
        if len(train) > 1:
            draw.line([xy(s, v) for s, v in train], fill=(31, 91, 180), width=2)
        for s, v in test:
            x, y = xy(s, v)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 40, 40))
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    atomic_write(path, lambda f: img.save(f, format="PNG"))


def save_grid(path, images: torch.Tensor) -> None:
    """Save logit-space images ``(n, C, L, L)`` as one PNG grid."""
    from torchvision.utils import save_image

    pixels = inverse_logit_transform(images.float()).clamp(0, 1).cpu()
    nrow = max(1, math.isqrt(images.shape[0] - 1) + 1) if images.shape[0] else 1
    atomic_write(path, lambda f: save_image(pixels, f, nrow=nrow, format="png"))


# ------------------------------------------------------------------------------------- data


def _batches(dataset, indices: list[int], batch_size: int, workers: int):
    """Yield uint8 batches ``(b, C, L, L)`` of ``dataset[indices]``, ``batch_size`` at a time."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if isinstance(dataset, UInt8Images):
        for chunk in chunks:
            yield dataset.batch(chunk)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers)
    yield from loader


def _to_unit(x: torch.Tensor, device) -> torch.Tensor:
    """uint8 ``(B, C, L, L)`` → float32 in ``[0, 1]`` (``v/255``) on ``device``."""
    return x.to(device, non_blocking=True).float().div_(255)


@torch.no_grad()
def evaluate(model: RGFlow, dataset, batch_size: int, device, seed: int = 0, world=None, workers: int = 0) -> tuple[float, int]:
    """Mean bits/dim of ``model`` over ``dataset`` (dequantisation noise seeded by ``seed``)
    and the number of images; sharded over ranks when ``world`` is a :class:`_Dist`."""
    rank, size = (world.rank, world.world) if world else (0, 1)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    indices = list(range(rank, len(dataset), size))
    for i, x in enumerate(_batches(dataset, indices, batch_size, workers)):
        g = _step_generator(device, seed, i, rank)
        y, ldj_data = preprocess(_to_unit(x, device), generator=g)
        bpd = bits_per_dim(model.log_prob(y), ldj_data, model.num_dims)
        total += torch.stack([bpd.double().sum(), bpd.new_tensor(bpd.numel(), dtype=torch.float64)])
    if world is not None and world.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    s, n = total.tolist()
    return s / max(n, 1), int(n)


# ------------------------------------------------------------------------------ run config


def _resolve(args, saved: dict | None) -> dict:
    """The run's config: preset (or the resumed run's saved config), then explicit flags."""
    if saved is not None:
        if args.preset is not None and args.preset != saved["preset"]:
            raise RunError(
                f"--preset {args.preset} differs from the resumed run's preset {saved['preset']}; "
                "drop --preset to continue that run, or start a new run with another --out"
            )
        cfg = json.loads(json.dumps(saved))
    else:
        preset = PRESETS[args.preset or "small"]
        cfg = {
            "preset": args.preset or "small",
            "dataset": preset["dataset"],
            "data_dir": None,
            "data_seed": 0,
            "image_size": None,
            "train_size": preset["train_size"],
            "test_size": preset["test_size"],
            "model": {k: preset[k] for k in ("kernel_size", "n_layers", "n_res_blocks", "n_mlp", "hidden")}
            | {"prior": "laplace"},
            "steps": preset["steps"],
            "epochs": preset["epochs"],
            "batch_size": preset["batch_size"],
            **OPTIM_DEFAULTS,
            "seed": 0,
            "log_every": preset["log_every"],
            "ckpt_every": preset["ckpt_every"],
            "keep": 3,
            "sample_n": 64,
            "sample_temperature": None,
        }
    for key in ("dataset", "data_dir", "data_seed", "image_size", "train_size", "test_size", "batch_size",
                "lr", "weight_decay", "clip_grad", "seed", "log_every", "ckpt_every", "keep", "sample_n",
                "sample_temperature"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.steps is not None or args.epochs is not None:
        cfg["steps"], cfg["epochs"] = args.steps, args.epochs
    for key in _MODEL_FLAGS:
        value = getattr(args, key)
        if value is not None:
            cfg["model"][key] = value
    if cfg["data_dir"] is not None:
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser())
    for key in ("batch_size", "log_every", "ckpt_every", "keep", "sample_n"):
        if cfg[key] < 1:
            raise RunError(f"--{key.replace('_', '-')} must be >= 1; got {cfg[key]}")
    for key in ("steps", "epochs"):
        if cfg[key] is not None and cfg[key] < 1:
            raise RunError(f"--{key} must be >= 1; got {cfg[key]}")
    if not (cfg["lr"] > 0 and cfg["weight_decay"] >= 0 and cfg["clip_grad"] >= 0):
        raise RunError("--lr must be > 0, --weight-decay and --clip-grad >= 0 (0 disables clipping)")
    return cfg


def _model_kwargs(cfg: dict, info) -> dict:
    m = cfg["model"]

    def one(v):  # a single value applies to every level
        return v[0] if isinstance(v, list) and len(v) == 1 else v

    return dict(
        image_size=info.image_size, channels=info.channels, kernel_size=m["kernel_size"],
        n_layers=one(m["n_layers"]), n_res_blocks=one(m["n_res_blocks"]), n_mlp=one(m["n_mlp"]),
        hidden=one(m["hidden"]), prior=m["prior"],
    )


def _checkpoints(folder: Path) -> list[Path]:
    """``step_*.pt`` files in ``folder``, oldest step first."""
    found = []
    for p in folder.glob("step_*.pt"):
        try:
            found.append((int(p.stem.split("_", 1)[1]), p))
        except ValueError:
            continue
    return [p for _, p in sorted(found)]


def _read_training_checkpoint(path: Path, device) -> dict:
    try:
        payload = load_checkpoint(path, map_location=device)
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(str(exc)) from exc
    missing = [k for k in ("train", "optimizer", "step") if k not in payload]
    if missing:
        raise RunError(
            f"checkpoint {path} holds a model but no training state ({', '.join(missing)} missing); "
            "it can be sampled or evaluated, not resumed"
        )
    return payload


def _resume_source(args) -> tuple[Path | None, Path | None]:
    """``(checkpoint to resume from or None, run folder or None)``."""
    if args.resume is None:
        return None, Path(args.out) if args.out else None
    if args.resume == "latest":
        if not args.out:
            raise RunError("--resume without a checkpoint continues the run in --out DIR; pass --out")
        out = Path(args.out)
        found = _checkpoints(out / "checkpoints")
        if not found:
            raise RunError(f"nothing to resume: {out / 'checkpoints'} holds no step_*.pt checkpoint")
        return found[-1], out
    ckpt = Path(args.resume)
    if args.out:
        return ckpt, Path(args.out)
    # a checkpoint inside a run folder continues that run
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return ckpt, run


# -------------------------------------------------------------------------------- training


def train(args) -> int:
    world = _Dist(args.device)
    try:
        return _train(args, world)
    finally:
        world.close()


def _train(args, world: _Dist) -> int:
    device = world.device
    require_torchvision()  # for the sample grids: fail now, not at the first checkpoint
    if args.amp and device.type != "cuda":
        raise RunError("--amp trains in bf16 autocast on a CUDA device; this run is on the CPU: drop --amp")
    ckpt_path, out = _resume_source(args)
    payload = _read_training_checkpoint(ckpt_path, device) if ckpt_path else None
    cfg = _resolve(args, payload["train"] if payload else None)
    cfg["world_size"] = world.world
    if payload:
        saved = payload["train"]
        diff = [k for k in RESUME_KEYS if cfg.get(k) != saved.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}" for k in diff)
            raise RunError(
                f"cannot resume {ckpt_path} with a different config ({detail}); drop those flags to "
                "continue the run (or use as many processes as it had), or start a new run with another --out"
            )
    # rank 0 decides: the other ranks may look only after rank 0 has started writing there
    elif out is not None and world.broadcast((out / "config.json").exists() or bool(_checkpoints(out / "checkpoints"))):
        raise RunError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")

    info = dataset_info(cfg["dataset"], cfg["image_size"])
    if cfg["batch_size"] % world.world:
        raise RunError(
            f"--batch-size {cfg['batch_size']} (the global batch) must be divisible by the number of "
            f"processes ({world.world})"
        )
    local_batch = cfg["batch_size"] // world.world
    train_set = load_dataset(cfg["dataset"], "train", cfg["data_dir"], cfg["train_size"], cfg["data_seed"], info.image_size)
    test_set = load_dataset(cfg["dataset"], "test", cfg["data_dir"], cfg["test_size"], cfg["data_seed"], info.image_size)
    sampler = torch.utils.data.DistributedSampler(
        train_set, num_replicas=world.world, rank=world.rank, shuffle=True, seed=cfg["seed"], drop_last=True
    )
    steps_per_epoch = len(sampler) // local_batch
    if steps_per_epoch < 1:
        raise RunError(
            f"the training set ({len(train_set)} images) is smaller than one global batch "
            f"({cfg['batch_size']}); lower --batch-size or raise --train-size"
        )
    total = cfg["steps"] if cfg["steps"] is not None else cfg["epochs"] * steps_per_epoch

    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    try:
        model = RGFlow(**_model_kwargs(cfg, info))
    except (TypeError, ValueError) as exc:
        raise RunError(f"invalid model config {cfg['model']}: {exc}") from exc
    model.check_inputs = False  # inputs come from the data transform; skip the per-call sync
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start = 0
    if payload:
        try:
            if payload["config"] != model.config:
                raise ValueError(f"its model config {payload['config']} is not {model.config}")
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunError(f"checkpoint {ckpt_path} does not fit its own config: {exc}") from exc
        start = int(payload["step"])
        if start >= total:
            raise RunError(f"the run in {out} already reached step {start} (of {total}); pass a larger --steps/--epochs")

    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = Path(world.broadcast(f"runs/{cfg['dataset']}-{cfg['preset']}-{stamp}"))
    metrics_path = out / "metrics.jsonl"
    temperature = _temperature(cfg["sample_temperature"], model, "--sample-temperature")

    run_cfg = {**cfg, "steps_total": total, "steps_per_epoch": steps_per_epoch, "num_parameters": model.num_parameters()}
    history = []  # (step, bpd) and (step, test_bpd) for the curve
    if world.main:
        atomic_write(out / "config.json", lambda f: f.write(json.dumps(run_cfg, indent=2).encode()))
        kept = []
        if payload and metrics_path.exists():
            # records past the checkpoint belong to a timeline that the resumed run replaces
            for line in metrics_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", math.inf) <= start:
                    kept.append(record)
        atomic_write(metrics_path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
        history = kept

    net = model
    if world.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.amp else nullcontext()
    if world.main:
        print(
            f"training RGFlow ({model.num_parameters():,} parameters) on {cfg['dataset']} "
            f"({len(train_set)} train / {len(test_set)} test images) for {total} steps "
            f"({steps_per_epoch} per epoch), {world.world} process(es) on {device}, backend "
            f"{args.backend}; output in {out}",
            flush=True,
        )

    progress = Progress(total, start, world.main and not args.quiet)
    t_start = time.perf_counter()
    window = torch.zeros(3, dtype=torch.float64)  # sum of bpd, grad norm, count since last record
    epoch = None
    step = start
    last_ckpt = ckpt_path
    model.train()
    with backends.use_backend(args.backend):
        while step < total:
            e, i = divmod(step, steps_per_epoch)
            if e != epoch:
                sampler.set_epoch(e)
                epoch = e
                order = list(sampler)[i * local_batch : steps_per_epoch * local_batch]
                batches = _batches(train_set, order, local_batch, args.workers)
            x = _to_unit(next(batches), device)
            g = _step_generator(device, cfg["seed"], step, world.rank)
            if info.flip:
                flip = torch.rand(x.shape[0], generator=g, device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            y, ldj_data = preprocess(x, generator=g)
            with autocast:
                z, ldj = net(y)
            log_prob = ldj.float() + model.prior.log_prob(z.float())
            nll = -(log_prob + ldj_data) / model.num_dims  # nats per dimension
            loss = nll.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip_grad"] or math.inf)
            stats = world.all_mean(torch.stack([loss.detach().float(), grad_norm.float()]))
            loss_value, norm_value = stats.tolist()
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                progress.close()
                where = (
                    f"the last good checkpoint is {last_ckpt}; resume from it with --resume (perhaps with a lower --lr)"
                    if last_ckpt
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLoss(
                    f"the loss is {loss_value} (gradient norm {norm_value}) at step {step + 1}; stopped "
                    f"before updating the weights: {where}"
                )
            optimizer.step()
            step += 1
            bpd_value = (loss_value + math.log(256)) / math.log(2)
            window += torch.tensor([bpd_value, norm_value, 1.0], dtype=torch.float64)
            progress.update(step, f"bpd {bpd_value:.3f}")

            is_ckpt = step % cfg["ckpt_every"] == 0 or step == total
            if step % cfg["log_every"] == 0 or is_ckpt:
                elapsed = time.perf_counter() - t_start
                record = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "bpd": window[0].item() / window[2].item(),
                    "grad_norm": window[1].item() / window[2].item(),
                    "lr": optimizer.param_groups[0]["lr"],
                    "time": round(elapsed, 3),
                    "images_per_s": round((step - start) * cfg["batch_size"] / max(elapsed, 1e-9), 2),
                }
                window.zero_()
                if is_ckpt:
                    world.check_in_sync(model, step)
                    record["test_bpd"], _ = evaluate(model, test_set, local_batch, device, world=world)
                if world.main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    history.append(record)
                if is_ckpt and world.main:
                    last_ckpt = _save_run_state(out, model, optimizer, step, run_cfg, cfg["keep"])
                    sample_gen = torch.Generator(device=device).manual_seed(cfg["seed"])
                    model.eval()
                    save_grid(out / "samples" / f"step_{step:08d}.png",
                              model.sample(cfg["sample_n"], temperature=temperature, generator=sample_gen))
                    model.train()
                    plot_curve(out / "bpd.png",
                               [(r["step"], r["bpd"]) for r in history if "bpd" in r],
                               [(r["step"], r["test_bpd"]) for r in history if "test_bpd" in r])
                    if not progress.enabled and not args.quiet:
                        print(f"step {step}/{total} bpd {record['bpd']:.4f} test bpd {record['test_bpd']:.4f} "
                              f"({elapsed:.1f} s)", flush=True)
    progress.close()
    if world.main and not args.quiet:
        print(f"done: {total} steps in {time.perf_counter() - t_start:.1f} s; checkpoint {last_ckpt}", flush=True)
    return 0


def _save_run_state(out: Path, model, optimizer, step, run_cfg, keep) -> Path:
    folder = out / "checkpoints"
    train_cfg = {k: v for k, v in run_cfg.items() if k not in ("steps_total", "steps_per_epoch", "num_parameters")}
    path = save_checkpoint(
        folder / f"step_{step:08d}.pt", model, optimizer=optimizer.state_dict(), step=step, train=train_cfg
    )
    for old in _checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------- sample and eval


def _load_for_inference(args):
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise RunError(f"unknown --device {args.device!r}; use auto, cpu, cuda or cuda:N") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RunError(f"--device {args.device} asked for CUDA but torch sees no CUDA device; use --device cpu")
    try:
        payload = load_checkpoint(args.checkpoint, map_location="cpu")
        model = load_model(args.checkpoint, map_location="cpu")
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(str(exc)) from exc
    model.check_inputs = False
    return model.to(device), payload, device


def sample(args) -> int:
    require_torchvision()
    model, _, device = _load_for_inference(args)
    if args.n < 1:
        raise RunError(f"--n must be >= 1; got {args.n}")
    temperature = _temperature(args.temperature, model, "--temperature")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    model.eval()
    with backends.use_backend(args.backend):
        images = model.sample(args.n, temperature=temperature, generator=generator)
    save_grid(args.out, images)
    print(f"wrote {args.n} samples (temperature {temperature}) to {args.out}")
    return 0


def evaluate_command(args) -> int:
    model, payload, device = _load_for_inference(args)
    saved = payload.get("train", {})
    name = args.dataset or saved.get("dataset")
    if name is None:
        raise RunError(f"checkpoint {args.checkpoint} does not say its dataset; pass --dataset")
    data_dir = args.data_dir or saved.get("data_dir")
    size = args.size if args.size is not None else (saved.get("test_size") if args.dataset is None else None)
    info = dataset_info(name, model.image_size)
    if (info.channels, info.image_size) != (model.channels, model.image_size):
        raise RunError(
            f"dataset {name} has {info.channels}×{info.image_size}×{info.image_size} images but the model "
            f"takes {model.channels}×{model.image_size}×{model.image_size}"
        )
    data_seed = saved.get("data_seed", 0) if args.data_seed is None else args.data_seed
    data = load_dataset(name, args.split, data_dir, size, data_seed, info.image_size)
    with backends.use_backend(args.backend):
        bpd, n = evaluate(model, data, args.batch_size, device, seed=args.seed, workers=args.workers)
    if args.json:
        print(json.dumps({"dataset": name, "split": args.split, "images": n, "bpd": bpd}))
    else:
        print(f"{args.split} bits/dim {bpd:.4f} ({n} {name} images)")
    return 0


# ------------------------------------------------------------------------------------- CLI


def _guard(func, name):
    """Run ``func(args)``; report :class:`RunError` and :class:`DataError` as one line, exit 2
    (1 for a non-finite loss)."""

    def run(args):
        try:
            return func(args)
        except (RunError, DataError) as exc:
            prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            print(f"rgflow-fast {name}: error: {prefix}{exc}", file=sys.stderr, flush=True)
            return 1 if isinstance(exc, NonFiniteLoss) else 2

    return run


def _common(p):
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS,
                   help="RG op backend (see rgflow-fast info)")


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train", help="train an RG-Flow (default: a small model on synthetic MSDS1, a few minutes on a CPU)",
        description="Train RG-Flow. Flags left out take the preset's values (or, with --resume, the run's).",
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="size and length of the run (default small)")
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None, help="default msds1 (paper-celeba: celeba32)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files (never downloaded)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the generated MSDS data (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="image side for --dataset folder (default 32)")
    p.add_argument("--train-size", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test images")
    g = p.add_argument_group("model")
    g.add_argument("--kernel-size", type=int, default=None)
    g.add_argument("--n-layers", type=int, nargs="+", default=None, help="RNVP layers per block: one value or one per level")
    g.add_argument("--n-res-blocks", type=int, nargs="+", default=None)
    g.add_argument("--n-mlp", type=int, nargs="+", default=None)
    g.add_argument("--hidden", type=int, nargs="+", default=None)
    g.add_argument("--prior", choices=("laplace", "gaussian"), default=None)
    g = p.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None)
    length.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch, split over processes (default 64)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 5e-5)")
    g.add_argument("--clip-grad", type=float, default=None, help="global grad-norm clip, 0 disables (default 1)")
    g.add_argument("--seed", type=int, default=None, help="weights, data order and noise (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<preset>-<time>)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue the run in --out from its latest checkpoint, or from CHECKPOINT")
    g.add_argument("--log-every", type=int, default=None, help="steps between metrics records")
    g.add_argument("--ckpt-every", type=int, default=None, help="steps between checkpoints, samples and test bits/dim")
    g.add_argument("--keep", type=int, default=None, help="checkpoints kept (default 3)")
    g.add_argument("--sample-n", type=int, default=None, help="images per sample grid (default 64)")
    g.add_argument("--sample-temperature", type=float, nargs="+", default=None,
                   help="one value or one per level (default: the paper's 0.2 on level 0, 0.8 above)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary lines")
    g = p.add_argument_group("system")
    _common(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes for file datasets (default 4)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.set_defaults(func=_guard(train, "train"))

    p = sub.add_parser("sample", help="draw a PNG grid of samples from a checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--temperature", type=float, nargs="+", default=None,
                   help="one value or one per RG level (default: the paper's 0.2 on level 0, 0.8 above)")
    p.add_argument("--out", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=_guard(sample, "sample"))

    p = sub.add_parser("eval", help="bits/dim of a checkpoint on its test set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None, help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--data-seed", type=int, default=None)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--size", type=int, default=None, help="first N images (default: the run's --test-size, else all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes for file datasets")
    p.add_argument("--seed", type=int, default=0, help="dequantisation noise")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _common(p)
    p.set_defaults(func=_guard(evaluate_command, "eval"))
