"""``rgflow-fast train``, ``sample`` and ``eval``."""
from __future__ import annotations

import json
from dataclasses import fields

import torch

from .. import backends
from ..data import DATASETS, dataset_info, load_dataset
from ..training import PRESETS, RunConfig, RunError, RunOptions, evaluate, sample_temperature, train
from ..training.outputs import read_checkpoint, save_grid
from . import add_system_flags, guard, require_positive, set_threads, setup


def _train(args) -> int:
    set_threads(args)
    if args.workers < 0:
        raise RunError(f"--workers must be >= 0; got {args.workers}")
    flags = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    options = RunOptions(device=args.device, backend=args.backend, compile=args.compile, amp=args.amp,
                         workers=args.workers, quiet=args.quiet, cuda_graphs=args.cuda_graphs)
    train(flags, out=args.out, resume=args.resume, options=options)
    return 0


def _sample(args) -> int:
    require_positive(args, "n")
    device = setup(args)
    model, payload = read_checkpoint(args.checkpoint, device)
    model.check_inputs = False
    run_temperature = payload.get("train", {}).get("sample_temperature")
    temperature = sample_temperature(args.temperature or run_temperature, model, "--temperature")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with backends.use_backend(args.backend):
        images = model.eval().sample(args.n, temperature=temperature, generator=generator)
    save_grid(args.out, images)
    print(f"wrote {args.n} samples (temperature {temperature}) to {args.out}")
    return 0


def _eval(args) -> int:
    require_positive(args, "batch_size", "size")
    device = setup(args)
    model, payload = read_checkpoint(args.checkpoint, device)
    model.check_inputs = False
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
        bpd, n = evaluate(model, data, args.batch_size, device, seed=args.seed, workers=args.workers,
                          progress=not args.json)
    if args.json:
        print(json.dumps({"dataset": name, "split": args.split, "images": n, "bpd": bpd}))
    else:
        print(f"{args.split} bits/dim {bpd:.4f} ({n} {name} images)")
    return 0


def _add_train(sub) -> None:
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
    g.add_argument("--dtype", choices=("float32", "float64"), default=None, help="weights and data (default float32)")
    g = p.add_argument_group("optimisation")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None)
    length.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch, split over processes (paper presets 64, small 16)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (paper presets 1e-3, small 1.5e-2)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                   help="constant (paper presets), or cosine from --lr to --lr/100 over the run (small)")
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
                   help="one value or one per level (default: the preset's; else the paper's 0.2 on level 0, 0.8 above)")
    g.add_argument("--quiet", action="store_true", help="no progress or summary lines")
    g = p.add_argument_group("system")
    add_system_flags(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes for file datasets (default 4)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay each training step as one captured CUDA graph (one CUDA device, one process)")
    p.set_defaults(func=guard(_train, "train"))


def add_commands(sub) -> None:
    """Add ``train``, ``sample`` and ``eval``."""
    _add_train(sub)

    p = sub.add_parser("sample", help="draw a PNG grid of samples from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a step_*.pt file of a run")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--temperature", type=float, nargs="+", default=None,
                   help="one value or one per RG level (default: the run's --sample-temperature)")
    p.add_argument("--out", default="samples.png", help="PNG file (default samples.png)")
    p.add_argument("--seed", type=int, default=0)
    add_system_flags(p)
    p.set_defaults(func=guard(_sample, "sample"))

    p = sub.add_parser("eval", help="bits/dim of a checkpoint on its test set")
    p.add_argument("--checkpoint", required=True, help="a step_*.pt file of a run")
    p.add_argument("--dataset", choices=tuple(DATASETS), default=None, help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--data-seed", type=int, default=None)
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--size", type=int, default=None, help="first N images (default: the run's --test-size, else all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes for file datasets")
    p.add_argument("--seed", type=int, default=0, help="dequantisation noise")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_system_flags(p)
    p.set_defaults(func=guard(_eval, "eval"))
