"""The training loop: open (or resume) a run, then step, record, checkpoint.

Exact resumption: the data order of epoch ``e`` is a function of ``(seed, e)``
(``DistributedSampler``), and the dequantisation noise and flips of step ``s`` on rank ``r``
come from a generator seeded with ``(seed, s, r)``; a checkpoint therefore needs only the
weights, the optimizer state and the step.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import backends
from ..cuda_graphs import capture_training_step
from ..data import UInt8Images, dataset_info, load_dataset, require_torchvision
from ..model import RGFlow
from ..transforms import bits_per_dim, preprocess
from .config import DTYPES, RunConfig, paper_temperature, resolve
from .distributed import World, check_backend, step_generator
from .errors import NonFiniteLoss, RunError
from .outputs import RunFolder, plot_bpd, save_grid
from .progress import Progress

__all__ = ["RunOptions", "train", "evaluate", "sample_temperature"]


@dataclass(frozen=True)
class RunOptions:
    """How this process runs a training (not part of the run's identity: a resumed run may
    change them)."""

    device: str = "auto"
    backend: str = "auto"
    compile: bool = False
    amp: bool = False  # bf16 autocast, CUDA only
    workers: int = 4  # data-loading processes for file datasets
    quiet: bool = False  # no progress or summary lines (the banner stays)
    cuda_graphs: bool = False  # replay the model's step as a captured CUDA graph


def sample_temperature(values, model: RGFlow, flag: str):
    """A sampling temperature from a flag's values (default :func:`paper_temperature`),
    checked by the prior: one value, or one per RG level."""
    values = list(values or paper_temperature(model.n_levels))
    temperature = values[0] if len(values) == 1 else values
    try:
        model.prior.scale_map(temperature)
    except ValueError as exc:
        raise RunError(f"{flag}: {exc}") from None
    return temperature


# ------------------------------------------------------------------------------------- data


def _batches(dataset, indices: list[int], batch_size: int, workers: int):
    """Yield uint8 batches ``(b, C, L, L)`` of ``dataset[indices]``, ``batch_size`` at a time."""
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if isinstance(dataset, UInt8Images):
        for chunk in chunks:
            yield dataset.batch(chunk)
        return
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=workers)


def _to_unit(x: torch.Tensor, device, dtype) -> torch.Tensor:
    """uint8 ``(B, C, L, L)`` → ``[0, 1]`` (``v/255``) in ``dtype`` on ``device``."""
    return x.to(device, non_blocking=True).to(dtype).div_(255)


@torch.no_grad()
def evaluate(model: RGFlow, dataset, batch_size: int, device, seed: int = 0, world: World | None = None,
             workers: int = 0, progress: bool = False) -> tuple[float, int]:
    """Mean bits/dim of ``model`` over ``dataset`` (dequantisation noise seeded by ``seed``)
    and the number of images; sharded over ranks when ``world`` is given."""
    rank, size = (world.rank, world.size) if world else (0, 1)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    indices = list(range(rank, len(dataset), size))
    with Progress(math.ceil(len(indices) / batch_size), "eval", unit="batch", enabled=progress and rank == 0) as bar:
        for i, x in enumerate(_batches(dataset, indices, batch_size, workers)):
            y, ldj_data = preprocess(_to_unit(x, device, dtype), generator=step_generator(device, seed, i, rank))
            bpd = bits_per_dim(model.log_prob(y), ldj_data, model.num_dims)
            total += torch.stack([bpd.double().sum(), bpd.new_tensor(bpd.numel(), dtype=torch.float64)])
            bar.update(bpd=total[0].item() / total[1].item())
    if world is not None:
        world.all_sum(total)
    model.train(was_training)
    s, n = total.tolist()
    return s / max(n, 1), int(n)


# ------------------------------------------------------------------------------ opening a run


@dataclass
class _Run:
    """A run in progress: its config, data, model and where it writes."""

    cfg: RunConfig
    options: RunOptions
    world: World
    folder: RunFolder
    model: RGFlow
    optimizer: torch.optim.Optimizer
    train_set: object
    test_set: object
    local_batch: int
    steps_per_epoch: int
    total: int
    start: int
    last_ckpt: Path | None
    flip: bool
    temperature: object = None
    net: torch.nn.Module = None
    history: list = field(default_factory=list)
    time_before: float = 0.0  # training seconds of the sessions before this one
    captured: object = None  # the CUDA-graph step, captured at the first step (--cuda-graphs)

    @property
    def dtype(self):
        return DTYPES[self.cfg.dtype]

    def saved_config(self) -> dict:
        return {**self.cfg.to_dict(), "steps_total": self.total, "steps_per_epoch": self.steps_per_epoch,
                "num_parameters": self.model.num_parameters()}


def _resume_source(resume, out, world: World) -> tuple[Path | None, RunFolder | None]:
    """``(checkpoint to resume from or None, run folder or None)``. A folder without a
    checkpoint is not a run (one stopped before its first checkpoint): it is started afresh."""
    folder = RunFolder(out) if out else None
    if resume is None:
        # rank 0 decides: the other ranks may look only after rank 0 has started writing there
        if folder is not None and world.broadcast(bool(folder.checkpoints())):
            raise RunError(f"{out} already holds a run; pass --resume to continue it, or choose another --out")
        return None, folder
    if resume == "latest":
        if folder is None:
            raise RunError("--resume without a checkpoint continues the run in --out DIR; pass --out")
        found = world.broadcast(folder.checkpoints())
        if not found and world.main:
            print(f"{out} holds no checkpoint (a run stopped before its first one): starting the run afresh there",
                  flush=True)
        return (found[-1] if found else None), folder
    ckpt = Path(resume)
    if folder is None:  # a checkpoint inside a run folder continues that run
        folder = RunFolder(ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    return ckpt, folder


def _build_model(cfg: RunConfig, channels: int, image_size: int, device) -> RGFlow:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    try:
        model = RGFlow(**cfg.model_kwargs(channels, image_size))
    except (TypeError, ValueError) as exc:
        raise RunError(f"invalid model config: {exc}") from None
    model.check_inputs = False  # inputs come from the data transform; skip the per-call sync
    return model.to(device=device, dtype=DTYPES[cfg.dtype])


def _open(flags: dict, out, resume, options: RunOptions, world: World) -> _Run:
    """Check everything, then build the run; nothing is written before the checks pass."""
    device = world.device
    require_torchvision()  # for the sample grids: fail now, not at the first checkpoint
    if options.amp and device.type != "cuda":
        raise RunError("--amp trains in bf16 autocast on a CUDA device; this run is on the CPU: drop --amp")
    _check_cuda_graphs(options, device, world)
    ckpt, folder = _resume_source(resume, out, world)
    payload = folder.read_state(ckpt, device)[1] if ckpt else None
    cfg = resolve(flags, RunConfig.from_dict(_flat(payload["train"])) if payload else None, world.size)
    check_backend(options.backend, device, DTYPES[cfg.dtype])
    info = dataset_info(cfg.dataset, cfg.image_size)
    if cfg.batch_size % world.size:
        raise RunError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the number of "
                       f"processes ({world.size})")
    local_batch = cfg.batch_size // world.size
    train_set = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.train_size, cfg.data_seed, info.image_size)
    test_set = load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.test_size, cfg.data_seed, info.image_size)
    steps_per_epoch = len(train_set) // world.size // local_batch
    if steps_per_epoch < 1:
        raise RunError(f"the training set ({len(train_set)} images) is smaller than one global batch "
                       f"({cfg.batch_size}); lower --batch-size or raise --train-size")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    model = _build_model(cfg, info.channels, info.image_size, device)
    # fused: one kernel for all parameters rather than a Python loop over thousands of tensors
    # (about 100 ms a step on the CPU for the 3,136 tensors of a 4-layer, 4-block model).
    # A captured step keeps its step count and learning rate on the device.
    lr = torch.tensor(cfg.lr, device=device) if options.cuda_graphs else cfg.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=True,
                                  capturable=options.cuda_graphs)
    start = _restore(model, optimizer, payload, ckpt, total, folder) if payload else 0
    if folder is None:
        folder = RunFolder(world.broadcast(f"runs/{cfg.dataset}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    run = _Run(cfg, options, world, folder, model, optimizer, train_set, test_set, local_batch,
               steps_per_epoch, total, start, ckpt, info.flip)
    run.temperature = sample_temperature(cfg.sample_temperature, model, "--sample-temperature")
    return run


def _flat(saved: dict) -> dict:
    """A saved run config; runs written by rgflow_fast 0.1 nest the model flags under "model"."""
    return {**saved.get("model", {}), **{k: v for k, v in saved.items() if k != "model"}}


def _restore(model, optimizer, payload: dict, ckpt: Path, total: int, folder: RunFolder) -> int:
    """Load the weights and optimizer state of ``payload``; returns its step."""
    try:
        if payload["config"] != model.config:
            raise ValueError(f"its model config {payload['config']} is not {model.config}")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunError(f"checkpoint {ckpt} does not match its own config: {exc}") from None
    start = int(payload["step"])
    if start >= total:
        raise RunError(f"the run in {folder.path} already reached step {start} (of {total}); "
                       "pass a larger --steps/--epochs")
    return start


def _start_writing(run: _Run) -> None:
    """Write ``config.json``, cut ``metrics.jsonl`` back to the resumed step, print the banner."""
    if not run.world.main:
        return
    run.folder.write_config(run.saved_config())
    run.history = run.folder.history(run.start)
    run.time_before = run.history[-1].get("time", 0.0) if run.history else 0.0
    cfg, model = run.cfg, run.model
    resumed = f"resumed at step {run.start} from {run.last_ckpt}; " if run.last_ckpt else ""
    print(
        f"training RGFlow ({model.num_parameters():,} parameters, {cfg.dtype}) on {cfg.dataset} "
        f"({len(run.train_set)} train / {len(run.test_set)} test images) for {run.total} steps "
        f"({run.steps_per_epoch} per epoch); {resumed}{run.world.size} process(es) on {run.world.device} "
        f"with {torch.get_num_threads()} thread(s), backend {run.options.backend}; output in {run.folder.path}",
        flush=True,
    )


# ----------------------------------------------------------------------------------- stepping


def _train_batches(run: _Run):
    """``(step, uint8 batch)`` from the run's start to its end, in the data order of each
    epoch (a function of ``(seed, epoch)``)."""
    sampler = torch.utils.data.DistributedSampler(run.train_set, num_replicas=run.world.size,
                                                  rank=run.world.rank, shuffle=True, seed=run.cfg.seed, drop_last=True)
    step = run.start
    while step < run.total:
        epoch, i = divmod(step, run.steps_per_epoch)
        sampler.set_epoch(epoch)
        order = list(sampler)[i * run.local_batch : run.steps_per_epoch * run.local_batch]
        for x in _batches(run.train_set, order, run.local_batch, run.options.workers):
            yield step, x
            step += 1
            if step == run.total:
                return


def _check_cuda_graphs(options: RunOptions, device, world: World) -> None:
    if not options.cuda_graphs:
        return
    if device.type != "cuda":
        raise RunError(f"--cuda-graphs captures the training step on a CUDA device; this run is on {device}: "
                       f"drop --cuda-graphs or pass --device cuda")
    if world.size > 1:
        raise RunError("--cuda-graphs runs in one process; drop it for a multi-process (torchrun) run")
    if options.compile:
        raise RunError("--cuda-graphs and --compile both take over the step; choose one")


def _batch(run: _Run, step: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uint8 batch ``x`` of step ``step`` -> logit-space images and their transform's log-det
    (dequantisation noise and flips drawn from the step's own generator)."""
    device = run.world.device
    x = _to_unit(x, device, run.dtype)
    g = step_generator(device, run.cfg.seed, step, run.world.rank)
    if run.flip:
        flip = torch.rand(x.shape[0], generator=g, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return preprocess(x, generator=g)


def _model_loss(run: _Run, y: torch.Tensor) -> torch.Tensor:
    """``-mean log p(y) / dims``: the loss less the data transform's log-det (a constant)."""
    with torch.autocast("cuda", dtype=torch.bfloat16) if run.options.amp else nullcontext():
        z, ldj = run.net(y)
    log_prob = ldj.to(y.dtype) + run.model.prior.log_prob(z.to(y.dtype))
    return (-log_prob / run.model.num_dims).mean()


def _non_finite(run: _Run, step: int, loss_value: float, norm_value: float, updated: bool) -> NonFiniteLoss:
    where = (f"the last good checkpoint is {run.last_ckpt}; resume from it with --resume (perhaps with a lower "
             "--lr)" if run.last_ckpt else "no checkpoint was written yet")
    when = ("after the captured step had updated the weights in memory (nothing was saved)" if updated
            else "before updating the weights")
    return NonFiniteLoss(f"the loss is {loss_value} (gradient norm {norm_value}) at step {step + 1}; stopped "
                         f"{when}: {where}")


def _set_lr(run: _Run, step: int) -> None:
    lr = run.cfg.lr_at(step, run.total)
    for group in run.optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place: a captured step reads this very tensor
        else:
            group["lr"] = lr


def _step(run: _Run, step: int, x: torch.Tensor) -> tuple[float, float]:
    """One optimizer step on uint8 batch ``x``; returns the (all-process mean) loss in nats
    per dimension and the gradient norm. Stops before the update if either is not finite
    (with ``--cuda-graphs``, right after it: the update is part of the captured step)."""
    y, ldj_data = _batch(run, step, x)
    data_term = (ldj_data / run.model.num_dims).mean()
    _set_lr(run, step)
    if run.options.cuda_graphs:
        if run.captured is None:
            run.captured = capture_training_step(run.model, run.optimizer, y, lambda _, v: _model_loss(run, v),
                                                 clip_grad_norm=run.cfg.clip_grad or None)
        model_loss, grad_norm = run.captured(y)
        loss_value, norm_value = torch.stack([(model_loss - data_term).double(), grad_norm.double()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise _non_finite(run, step, loss_value, norm_value, updated=True)
        return loss_value, norm_value
    loss = _model_loss(run, y) - data_term  # nats per dimension
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad or math.inf)
    loss_value, norm_value = run.world.all_mean(torch.stack([loss.detach().double(), grad_norm.double()])).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise _non_finite(run, step, loss_value, norm_value, updated=False)
    run.optimizer.step()
    return loss_value, norm_value


def _record(run: _Run, step: int, window: torch.Tensor, t0: float, progress: Progress) -> None:
    """After step ``step``: a metrics record every ``log_every`` steps; test bits/dim, a
    checkpoint, a sample grid and the curve every ``ckpt_every`` steps and at the end."""
    is_ckpt = step % run.cfg.ckpt_every == 0 or step == run.total
    if not (step % run.cfg.log_every == 0 or is_ckpt):
        return
    elapsed = time.perf_counter() - t0
    record = {
        "step": step, "epoch": step / run.steps_per_epoch, "bpd": window[0].item() / window[2].item(),
        "grad_norm": window[1].item() / window[2].item(), "lr": run.optimizer.param_groups[0]["lr"],
        "time": round(run.time_before + elapsed, 3),  # training seconds since the run began, over resumes
        "images_per_s": round((step - run.start) * run.cfg.batch_size / max(elapsed, 1e-9), 2),
    }
    window.zero_()
    if is_ckpt:
        run.world.check_in_sync(run.model, step)
        record["test_bpd"], _ = evaluate(run.model, run.test_set, run.local_batch, run.world.device, world=run.world)
    if not run.world.main:
        return
    run.folder.append(record)
    run.history.append(record)
    if is_ckpt:
        _checkpoint(run, step)
        progress.write(f"step {step}/{run.total}: bits/dim {record['bpd']:.4f}, test {record['test_bpd']:.4f} "
                       f"({record['time']:.0f} s); checkpoint {run.last_ckpt.name}")


def _checkpoint(run: _Run, step: int) -> None:
    """Write the checkpoint, the sample grid of this step and the bits/dim curve."""
    run.last_ckpt = run.folder.save_state(run.model, run.optimizer, step, run.cfg.to_dict(), run.cfg.keep)
    generator = torch.Generator(device=run.world.device).manual_seed(run.cfg.seed)
    run.model.eval()
    with torch.no_grad():
        images = run.model.sample(run.cfg.sample_n, temperature=run.temperature, generator=generator)
    run.model.train()
    save_grid(run.folder.path / "samples" / f"step_{step:08d}.png", images)
    plot_bpd(run.folder.path / "bpd.png", run.history)


def _fit(run: _Run) -> None:
    world, model = run.world, run.model
    run.net = model
    if world.size > 1:
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        run.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if run.options.compile:
        run.net = torch.compile(run.net)
    window = torch.zeros(3, dtype=torch.float64)  # sums of bpd, grad norm and count since the last record
    t0 = time.perf_counter()
    model.train()
    enabled = world.main and not run.options.quiet
    with backends.use_backend(run.options.backend), Progress(run.total, "train", initial=run.start,
                                                             enabled=enabled) as progress:
        for step, x in _train_batches(run):
            loss, norm = _step(run, step, x)
            bpd = (loss + math.log(256)) / math.log(2)
            window += torch.tensor([bpd, norm, 1.0], dtype=torch.float64)
            progress.update(bpd=bpd)
            _record(run, step + 1, window, t0, progress)
    if enabled:
        print(f"done: {run.total} steps in {time.perf_counter() - t0:.1f} s; checkpoint {run.last_ckpt}", flush=True)


def train(flags: dict, out=None, resume=None, options: RunOptions = RunOptions()) -> Path:
    """Train RG-Flow and return the run folder.

    ``flags`` are :class:`RunConfig` fields (``None``: the preset's value, or the resumed
    run's); ``out`` the run folder (default ``runs/<dataset>-<preset>-<time>``); ``resume``
    ``"latest"`` (the last checkpoint in ``out``) or a checkpoint path. ``torchrun
    --nproc_per_node=N`` runs DistributedDataParallel; rank 0 alone writes files.
    Raises :class:`RunError` (with what to do) before writing anything when the run cannot
    start, :class:`NonFiniteLoss` when the loss stops being finite.
    """
    world = World(options.device)
    try:
        run = _open(flags, out, resume, options, world)
        _start_writing(run)
        _fit(run)
        # the processes leave together: a gloo process whose peer tore down its connections
        # while it was still in the last collectives' teardown aborts
        world.barrier()
        return run.folder.path
    finally:
        world.close()
