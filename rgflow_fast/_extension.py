"""Build, load and wire up the C++/CUDA extension behind backends ``"cpp"`` and ``"cuda"``.

The extension defines, with ``TORCH_LIBRARY``, the ops of the ``rg_coupling`` family in the
namespace ``rgflow_fast`` (CPU kernels: ``csrc/rg_coupling.cpp``; CUDA kernels of the same
schema: ``csrc/rg_coupling_cuda.cu``)::

    rgflow_fast::rg_gather(x, k, d, off) -> patches (B*P, C, k, k)
    rgflow_fast::rg_scatter(patches, x, k, d, off) -> image (B, C, L, L)
    rgflow_fast::rg_coupling(x, s, t, k, d, off, parity, inverse, emit) -> (y, ldj, v)
    rgflow_fast::rg_coupling_backward(x, s, t, grad_y, grad_ldj, grad_v?, k, d, off, parity,
                                      inverse) -> (grad_x, grad_s, grad_t)

This module registers their autograd formulas and fake (meta) kernels, so the dispatcher,
``torch.compile`` and ``torch.library.opcheck`` handle them like built-in ops. Gather and
scatter are differentiable any number of times; the coupling op once (its backward recomputes
``tanh s`` and ``exp`` from the saved inputs ``x, s, t``). The log-det is reduced in a fixed
order on both devices (per row, then per sample on the CPU; per block, then per sample on
CUDA), so every result is deterministic and, on the CPU, independent of the thread count.

How a part (``"cpu"`` or ``"cuda"``) is loaded, the first time a backend is probed
(:func:`rgflow_fast.available_backends`, :func:`rgflow_fast.use_backend`, or the first op that
``"auto"`` sends to it) — once per process:

1. the ahead-of-time build, ``rgflow_fast._C`` / ``rgflow_fast._C_cuda``, if installed
   (``RGFLOW_FAST_BUILD_EXT=1 pip install --no-build-isolation .``);
2. else a just-in-time build with :func:`torch.utils.cpp_extension.load` (ninja, against the
   installed torch), cached in torch's extension folder (``$TORCH_EXTENSIONS_DIR``, default
   ``~/.cache/torch_extensions``). The first build prints one line and takes about a minute
   (two for CUDA); later processes reuse the cache in about a second.

A part that cannot load makes its backend unavailable, with the reason (what is missing and
how to fix it) in :func:`unavailable_reason`. The CUDA part needs a CUDA build of torch, a
visible GPU and nvcc (``$CUDA_HOME/bin/nvcc``), and loads the CPU part first (the schema).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

__all__ = [
    "DTYPES",
    "compile_args",
    "source_dir",
    "unavailable_reason",
    "rg_gather",
    "rg_scatter",
    "rg_coupling",
    "rg_coupling_inverse",
    "rg_coupling_step",
]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# part -> (ahead-of-time module, just-in-time name, sources in csrc/, first-build time)
_PARTS = {
    "cpu": ("rgflow_fast._C", "rgflow_fast_cpu", ("rg_coupling.cpp",), "about a minute"),
    "cuda": ("rgflow_fast._C_cuda", "rgflow_fast_cuda", ("rg_coupling_cuda.cu",), "about two minutes"),
}


def source_dir() -> Path | None:
    """The folder with the C++/CUDA sources: ``rgflow_fast/csrc`` in a wheel, ``csrc/`` in a
    source checkout (None if neither exists)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "rg_coupling.cpp").is_file():
            return candidate
    return None


def compile_args() -> dict:
    """Compiler and linker flags of both builds (ahead-of-time in setup.py, just-in-time here).

    ``-fno-trapping-math`` (no floating-point traps are enabled, so results do not change)
    lets GCC vectorise the masked selects of the inner loops. ``-fopenmp`` where torch runs its
    thread pool on OpenMP: ``at::parallel_for`` is inline and runs serially when the extension
    is compiled without it.
    """
    cxx, ld = ["-O3", "-fno-trapping-math"], []
    if torch._C.has_openmp and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        ld.append("-fopenmp")
    return {"cxx": cxx, "nvcc": ["-O3"], "ld": ld}


def unavailable_reason(part: str) -> str | None:
    """Why ``part`` (``"cpu"`` or ``"cuda"``) cannot load here, or None once it has loaded.
    Builds it on the first call (see the module docstring)."""
    return _load(part)


@functools.lru_cache(maxsize=None)
def _load(part: str) -> str | None:
    module_name, _, _, _ = _PARTS[part]
    if part == "cuda":
        if torch.version.cuda is None:
            return "this torch is a CPU-only build; install a CUDA build of torch"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        reason = _load("cpu")
        if reason is not None:
            return f"it needs the CPU part of the extension, which cannot load: {reason}"
    spec = importlib.util.find_spec(module_name)
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except OSError as exc:
            return (
                f"the installed prebuilt extension {spec.origin} does not load ({exc}); it was "
                f"probably built against another torch: rebuild it with RGFLOW_FAST_BUILD_EXT=1 "
                f"pip install --no-build-isolation . (or reinstall without RGFLOW_FAST_BUILD_EXT "
                f"to build it on first use)"
            )
    else:
        reason = _build(part)
        if reason is not None:
            return reason
    if part == "cpu":
        _register_autograd_and_fake()
    return None


def _cpp_extension():
    """``torch.utils.cpp_extension``, imported without the "No CUDA runtime is found" warning
    it logs on machines without a GPU (its CUDA_HOME guess is irrelevant to a CPU build)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _build(part: str) -> str | None:
    """Just-in-time build and load of one part; None on success, else why it failed."""
    cpp_extension = _cpp_extension()

    _, name, sources, duration = _PARTS[part]
    src = source_dir()
    if src is None:
        return "its C++ sources (csrc/) are missing from this installation; reinstall rgflow-fast"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return (
            f"no C++ compiler found (looked for {cxx!r}, from $CXX or the default 'c++'): install "
            f"one (e.g. apt-get install g++, or conda install gxx) or point $CXX at it"
        )
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (it builds the extension): pip install ninja"
    if part == "cuda":
        home = cpp_extension.CUDA_HOME
        if home is None or not (Path(home) / "bin" / "nvcc").exists():
            return "nvcc was not found: install the CUDA toolkit and set CUDA_HOME to its folder"
        if not (Path(home) / "include" / "cuda_runtime.h").is_file():
            return (
                f"CUDA_HOME={home} is not a CUDA toolkit (no include/cuda_runtime.h; torch guesses "
                f"it from the nvcc on PATH, which may be a wrapper script): set CUDA_HOME to the "
                f"toolkit folder, the one with bin/nvcc and lib64/libcudart.so"
            )
    if not _is_cached(name, src):
        print(
            f"rgflow_fast: building the {part.upper()} extension (first use only, {duration}; "
            f"cached in torch's extension folder)...",
            file=sys.stderr,
            flush=True,
        )
    flags = compile_args()
    try:
        cpp_extension.load(
            name=name,
            sources=[str(src / f) for f in sources],
            extra_include_paths=[str(src)],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"],
            extra_ldflags=flags["ld"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # compiler, linker or loader failure: report it, the backend is off
        message = str(exc).strip()
        if len(message) > 2000:
            message = "..." + message[-2000:]
        return (
            f"building the extension failed ({type(exc).__name__}: {message}). Check the compiler "
            f"and torch installation; the build folder is under $TORCH_EXTENSIONS_DIR or "
            f"~/.cache/torch_extensions"
        )
    return None


def _is_cached(name: str, src: Path) -> bool:
    """Whether a just-in-time build newer than the sources exists (only chooses whether the
    progress line is printed; torch decides what to rebuild)."""
    cpp_extension = _cpp_extension()

    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private helper of torch; if it moves, just print the line
        return False
    built = [p.stat().st_mtime for p in build_dir.glob(f"{name}*") if p.suffix in (".so", ".pyd")]
    newest_source = max(p.stat().st_mtime for p in src.iterdir())
    return bool(built) and max(built) >= newest_source


# --- autograd formulas and fake kernels ----------------------------------------------------


def _patch_count(image_size, kernel_size, dilation):
    return (image_size // (kernel_size * dilation)) ** 2


def _register_autograd_and_fake() -> None:
    ops = torch.ops.rgflow_fast
    lib = "rgflow_fast::"

    def gather_fake(x, kernel_size, dilation, offset):
        P = _patch_count(x.shape[-1], kernel_size, dilation)
        return x.new_empty(x.shape[0] * P, x.shape[1], kernel_size, kernel_size)

    def gather_setup(ctx, inputs, output):
        x, *ctx.geometry = inputs
        ctx.image_shape = x.shape

    def gather_backward(ctx, grad):
        return ops.rg_scatter(grad, grad.new_zeros(ctx.image_shape), *ctx.geometry), None, None, None

    def scatter_fake(patches, x, kernel_size, dilation, offset):
        return x.new_empty(x.shape)

    def scatter_setup(ctx, inputs, output):
        patches, _, *ctx.geometry = inputs
        ctx.patch_shape = patches.shape

    def scatter_backward(ctx, grad):
        g_patches = ops.rg_gather(grad, *ctx.geometry) if ctx.needs_input_grad[0] else None
        g_x = None
        if ctx.needs_input_grad[1]:
            g_x = ops.rg_scatter(grad.new_zeros(ctx.patch_shape), grad, *ctx.geometry)
        return g_patches, g_x, None, None, None

    def coupling_fake(x, s, t, kernel_size, dilation, offset, parity, inverse, emit):
        v = s.new_empty(s.shape) if emit else x.new_empty(0)
        return x.new_empty(x.shape), x.new_empty(x.shape[0]), v

    def coupling_setup(ctx, inputs, output):
        x, s, t, *ctx.geometry, ctx.inverse, ctx.emit = inputs
        ctx.save_for_backward(x, s, t)

    def coupling_backward(ctx, g_y, g_ldj, g_v):
        x, s, t = ctx.saved_tensors
        g_y = torch.zeros_like(x) if g_y is None else g_y
        g_ldj = x.new_zeros(x.shape[0]) if g_ldj is None else g_ldj
        g_v = g_v if ctx.emit else None
        g_x, g_s, g_t = ops.rg_coupling_backward(x, s, t, g_y, g_ldj, g_v, *ctx.geometry, ctx.inverse)
        return g_x, g_s, g_t, None, None, None, None, None, None

    def coupling_backward_fake(x, s, t, g_y, g_ldj, g_v, kernel_size, dilation, offset, parity, inverse):
        return x.new_empty(x.shape), s.new_empty(s.shape), t.new_empty(t.shape)

    def no_double_backward(ctx, *grads):
        raise RuntimeError(
            "the 'cpp'/'cuda' backends' rg_coupling ops are differentiable once; for "
            "higher-order gradients run them under rgflow_fast.use_backend('torch')"
        )

    torch.library.register_fake(lib + "rg_gather", gather_fake)
    torch.library.register_autograd(lib + "rg_gather", gather_backward, setup_context=gather_setup)
    torch.library.register_fake(lib + "rg_scatter", scatter_fake)
    torch.library.register_autograd(lib + "rg_scatter", scatter_backward, setup_context=scatter_setup)
    torch.library.register_fake(lib + "rg_coupling", coupling_fake)
    torch.library.register_autograd(lib + "rg_coupling", coupling_backward, setup_context=coupling_setup)
    torch.library.register_fake(lib + "rg_coupling_backward", coupling_backward_fake)
    torch.library.register_autograd(
        lib + "rg_coupling_backward", no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


# --- the backend interface (see rgflow_fast.backends), shared by cpp_ops and cuda_ops --------


def rg_gather(x, kernel_size, dilation, offset):
    return torch.ops.rgflow_fast.rg_gather(x, kernel_size, dilation, offset)


def rg_scatter(patches, x, kernel_size, dilation, offset):
    return torch.ops.rgflow_fast.rg_scatter(patches, x, kernel_size, dilation, offset)


def rg_coupling(x, s, t, kernel_size, dilation, offset, parity):
    y, ldj, _ = torch.ops.rgflow_fast.rg_coupling(x, s, t, kernel_size, dilation, offset, parity, False, False)
    return y, ldj


def rg_coupling_inverse(y, s, t, kernel_size, dilation, offset, parity):
    x, inv_ldj, _ = torch.ops.rgflow_fast.rg_coupling(y, s, t, kernel_size, dilation, offset, parity, True, False)
    return x, inv_ldj


def rg_coupling_step(x, s, t, kernel_size, dilation, offset, parity, inverse):
    """One step that also emits ``v``: the patches of its output on the transformed half, zero
    elsewhere (the next step's net input). Returns ``(out, ldj, v)``."""
    return torch.ops.rgflow_fast.rg_coupling(x, s, t, kernel_size, dilation, offset, parity, inverse, True)
