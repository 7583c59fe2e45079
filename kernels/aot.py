"""Ahead-of-time compilation of every Triton kernel configuration the model launches, for a
GPU architecture, on a machine without a GPU:

    python -m rgflow_fast.kernels.aot --arch 90 --out DIR [--arch 80 ...] [--quick] [--jobs N]

writes one ``.cubin`` per configuration into ``DIR`` and prints, per configuration, its
registers per thread, spills (local-memory stores in its SASS, and the stack frame), shared
memory, and its tensor-core instructions (``HMMA``/``HGMMA`` in ``cuobjdump -sass``). Exits
non-zero if a configuration spills, or if a ``tf32``/``bf16`` layer kernel has no tensor-core
instruction.

The configurations are *recorded*, not listed by hand: the launchers of every kernel family
(``rgflow_fast.kernels.rg_coupling``: gather, scatter, coupling and its backward;
``rgflow_fast.kernels.rg_coupling_layer`` for each precision mode) run on CPU
tensors of the model's shapes with ``JITFunction.run`` replaced by a recorder, so each
launch's signature, constexprs and ``num_warps``/``num_stages`` are exactly what the launcher
would pass on a GPU. Shapes: the paper's CelebA-32 model (32×32×3, k=4, 4 residual blocks,
n_mlp 2, hidden 512) and the ``small`` training preset (1 block, n_mlp 1, hidden 64), batch 64.
Arguments get the JIT's divisibility specialisation (16-byte aligned pointers, integers that
are multiples of 16) as the recorded launch had them; the recorded sizes are multiples of 16.

``--quick`` keeps one representative of each kernel per precision (parity 0, forward
direction, paper shape): what ``tests/test_kernels_aot.py`` compiles.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MODEL_SHAPES = {
    # name: (channels, image_size, kernel_size, hidden, n_res_blocks, n_mlp)
    "paper": (3, 32, 4, 512, 4, 2),
    "small": (3, 32, 4, 64, 1, 1),
}
BATCH = 64
PRECISIONS = ("fp32", "tf32", "bf16")
_DTYPES = {
    "float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16",
    "int32": "i32", "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1",
}


@dataclass
class Launch:
    """One recorded kernel launch: what ``triton.compile`` needs to build it."""

    label: str
    fn: object  # triton JITFunction
    signature: dict
    constexprs: dict
    options: dict
    attrs: dict = field(default_factory=dict)
    precision: str | None = None  # the layer kernels' precision mode (None for other families)
    key: tuple = field(default=(), repr=False)


def _arg_type(value):
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _divisible_by_16(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


class Recorder:
    """Replaces ``JITFunction.run`` while active: launches are recorded, nothing runs."""

    def __init__(self):
        self.launches: dict[tuple, Launch] = {}
        self.label = "?"
        self.precision = None

    def __enter__(self):
        from triton.runtime.jit import JITFunction

        self._saved = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.record(fn, args, kwargs)

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction

        JITFunction.run = self._saved

    def record(self, fn, args, kwargs):
        names = fn.arg_names
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names and k in ("num_warps", "num_stages", "maxnreg")}
        for p in inspect.signature(fn.fn).parameters.values():
            if p.name not in bound and p.default is not inspect.Parameter.empty:
                bound[p.name] = p.default
        constexpr_names = {names[i] for i in fn.constexprs}
        signature, constexprs, attrs = {}, {}, {}
        for index, name in enumerate(names):
            value = bound[name]
            if name in constexpr_names or value is None:
                signature[name] = "constexpr"
                constexprs[name] = value
            else:
                signature[name] = _arg_type(value)
                if _divisible_by_16(value):  # as the JIT specialises a launch
                    attrs[(index,)] = [["tt.divisibility", 16]]
        key = (fn.fn.__module__, fn.__name__, tuple(signature.items()), tuple(sorted(attrs)),
               tuple((k, str(v)) for k, v in constexprs.items()), tuple(sorted(options.items())))
        if key not in self.launches:
            self.launches[key] = Launch(self.label, fn, signature, constexprs, options, attrs,
                                        self.precision, key)


def _record_rg_coupling(rec, shape_name, quick):
    """The rg_coupling family as the model calls it: gather, scatter, the coupling step (both
    directions, with and without the emitted net input) and its backward (with and without the
    emitted input's gradient), at every block's geometry (level h: dilation 2^h, offsets 0 and
    k·2^h/2), through the family's launchers."""
    import torch

    from rgflow_fast.geometry import block_specs
    from rgflow_fast.kernels import rg_coupling as K

    C, L, k = MODEL_SHAPES[shape_name][:3]
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        for spec in block_specs(L, k):
            d, off = spec.dilation, spec.offset
            rec.label = f"rg_coupling[{shape_name},{str(dtype)[6:]},d{d},o{off}]"
            x = torch.zeros(BATCH, C, L, L, dtype=dtype)
            patches = K.gather(x, k, d, off)
            K.scatter(patches, x, k, d, off)
            s = torch.zeros_like(patches)
            for inverse in (False, True):
                for emit in (False, True):
                    K.coupling(x, s, s, k, d, off, 0, inverse, emit)
                    K.coupling_backward(x, s, s, x, x[:, 0, 0, 0], s if emit else None, k, d, off,
                                        0, inverse)
            if quick:
                break


def _record_layer(rec, shape_name, quick, arch):
    """The fused layer's kernels for each precision mode: the forward step (both parities,
    forward and inverse, storing activations or not), its backward and the weight GEMMs."""
    import torch

    from rgflow_fast.kernels import rg_coupling_layer as K

    C, _, k, hidden, n_res, n_mlp = MODEL_SHAPES[shape_name]
    D = C * k * k
    N = 2 * 64  # rows: any count; only the launch configuration is recorded
    cuda = torch.device("cuda")
    for precision in PRECISIONS:
        cfg = K.tile_config(D, hidden, cuda, precision, arch)
        # operand and storage dtypes as rgflow_fast.triton_layer passes them
        wdt = torch.bfloat16 if precision == "bf16" else torch.float32
        w_in = torch.zeros(2 * n_res, cfg.HP, cfg.DP, dtype=wdt)
        w_mid = torch.zeros(max(1, 2 * n_res * (n_mlp - 1)), cfg.HP, cfg.HP, dtype=wdt)
        w_out = torch.zeros(2 * n_res, cfg.DP, cfg.HP, dtype=wdt)
        vec = torch.zeros(2, n_res, n_mlp + 1, 2, cfg.VW)
        sig = torch.zeros(2, cfg.DP)
        u = torch.zeros(N, D)
        rec.precision = precision
        for parity in (0,) if quick else (0, 1):
            for inverse in (False,) if quick else (False, True):
                stores = (True,) if quick else (True, False)
                rec.label = f"layer_fwd[{shape_name},{precision},p{parity},{'inv' if inverse else 'fwd'}]"
                for store in stores:
                    K.step_forward(u, w_in, w_mid, w_out, vec, sig, cfg, k, parity, inverse, n_res,
                                   n_mlp, precision, store, wdt)
                saved = torch.zeros(sum(K.saved_sizes(cfg, n_res, n_mlp, N)), dtype=wdt)
                rec.label = f"layer_bwd[{shape_name},{precision},p{parity},{'inv' if inverse else 'fwd'}]"
                K.step_backward(u, u, u[:, 0], saved, w_in, w_mid, w_out, vec, sig, cfg, k, parity,
                                inverse, n_res, n_mlp, precision)
        rec.label = f"layer_wgrad[{shape_name},{precision}]"
        NP = cfg.padded_rows(N)
        gdsave = torch.zeros(2, n_res, NP, cfg.DP, dtype=wdt)
        ghsave = torch.zeros(2, n_res, n_mlp, NP, cfg.HP, dtype=wdt)
        K.weight_grads(saved, gdsave, ghsave, vec, cfg, n_res, n_mlp, precision, torch.float32)
        rec.precision = None


def record_launches(quick=False, arch=90):
    """Every distinct kernel configuration of the model for ``sm_<arch>`` (module docstring)."""
    with Recorder() as rec:
        for shape_name in ("paper",) if quick else tuple(MODEL_SHAPES):
            _record_rg_coupling(rec, shape_name, quick)
            _record_layer(rec, shape_name, quick, arch)
    return list(rec.launches.values())


def _bin(tool):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def sass_stats(cubin: Path) -> dict:
    """Registers, stack, spill instructions, static shared memory and tensor-core instructions
    of a cubin (``cuobjdump -res-usage`` and ``-sass``)."""
    usage = subprocess.run([_bin("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "regs": int(res.get("REG", 0)),
        "stack": int(res.get("STACK", 0)),
        "spill_st": len(re.findall(r"\bSTL(?:\.\w+)*\b", sass)),
        "spill_ld": len(re.findall(r"\bLDL(?:\.\w+)*\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\.", sass)),
        "hgmma": len(re.findall(r"\bHGMMA\.", sass)),
    }


def _filename(launch: Launch, arch: int) -> str:
    tag = f"{launch.fn.__name__.strip('_')}.{launch.label}.{_key_hash(launch)}.sm{arch}.cubin"
    return re.sub(r"[^A-Za-z0-9_.,\[\]-]", "_", tag)


def _key_hash(launch):
    import hashlib

    return hashlib.sha1(repr(launch.key).encode()).hexdigest()[:8]


def compile_one(launch: Launch, arch: int, out: Path) -> dict:
    """Compile ``launch`` for ``sm_<arch>`` into ``out``; returns its row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    path = out / _filename(launch, arch)
    path.write_bytes(kernel.asm["cubin"])
    stats = sass_stats(path)
    flags = [k if v is True else f"{k}={v}" for k, v in launch.constexprs.items()
             if v is True or k in ("PARITY", "KIND")]
    label = launch.label + ("{" + ",".join(flags) + "}" if flags else "")
    stats.update(kernel=launch.fn.__name__, label=label, precision=launch.precision,
                 arch=arch, smem=kernel.metadata.shared, cubin=path.name,
                 num_warps=launch.options.get("num_warps", 4))
    return stats


_LAUNCHES: dict = {}  # arch -> recorded launches, set by main() before the workers fork


def _compile_job(args):
    index, arch, out, quick = args
    # a forked worker inherits the recorded launches; another start method records them again
    launches = _LAUNCHES.get(arch) or record_launches(quick, arch)
    return compile_one(launches[index], arch, Path(out))


def problems(row) -> list[str]:
    """What is wrong with a compiled configuration (empty when nothing is)."""
    found = []
    if row["spill_st"] or row["spill_ld"] or row["stack"]:
        found.append(f"spills ({row['spill_st']} STL, {row['spill_ld']} LDL, stack {row['stack']} B)")
    if row["precision"] in ("tf32", "bf16") and not (row["hmma"] + row["hgmma"]):
        found.append(f"no tensor-core instruction in {row['precision']} mode")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rgflow_fast.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", required=True,
                        help="compute capability without the dot (80, 90); repeat for several")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .cubin files")
    parser.add_argument("--quick", action="store_true", help="one configuration per kernel and precision")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args(argv)
    # compile, don't interpret: the kernels must be JITFunctions (set before Triton is imported)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" in sys.modules:
        parser.error("run in a fresh process without TRITON_INTERPRET=1 (kernels must be compiled, not interpreted)")
    os.environ["TRITON_INTERPRET"] = "0"
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in args.arch:
        _LAUNCHES[arch] = record_launches(args.quick, arch)
    jobs = [(i, arch, str(args.out), args.quick) for arch in args.arch for i in range(len(_LAUNCHES[arch]))]
    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(_compile_job, jobs))
    else:
        rows = [compile_one(_LAUNCHES[arch][i], arch, args.out) for i, arch, _, _ in jobs]
    header = f"{'kernel':<26} {'configuration':<62} {'sm':>3} {'warps':>5} {'regs':>4} {'spills':>6} {'smem':>6} {'HMMA':>5} {'HGMMA':>5}"
    print(header)
    print("-" * len(header))
    bad = 0
    for row in rows:
        issues = problems(row)
        bad += bool(issues)
        spills = row["spill_st"] + row["spill_ld"]
        print(f"{row['kernel']:<26} {row['label']:<62} {row['arch']:>3} {row['num_warps']:>5} "
              f"{row['regs']:>4} {spills:>6} {row['smem']:>6} {row['hmma']:>5} {row['hgmma']:>5}"
              + (f"   <- {'; '.join(issues)}" if issues else ""))
    print(f"{len(rows)} configurations compiled into {args.out}; {bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
