"""Build and load the C++/CUDA extension behind backends ``"cpp"`` and ``"cuda"``.

The extension defines, with ``TORCH_LIBRARY``, the ops of the backend contract in the
namespace ``rgflow_fast`` (schemas: :data:`rgflow_fast.backends.OP_SCHEMAS`; CPU kernels:
``csrc/rg_coupling.cpp``; CUDA kernels of the same schema: ``csrc/rg_coupling_cuda.cu``).
:mod:`rgflow_fast.cpp_ops` registers their autograd formulas and fake kernels once loaded.
The extension has two parts, one per device kind, each declared once in :data:`PARTS`
(the ahead-of-time build in ``setup.py`` reads the same declarations).

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

This module imports only torch and the standard library: ``setup.py`` runs it on its own.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["PARTS", "Part", "compile_args", "source_dir", "unavailable_reason"]


class Part(NamedTuple):
    """One part of the extension: the kernels of one device kind."""

    aot_module: str  # the ahead-of-time build's module name
    jit_name: str  # the just-in-time build's name (its folder in torch's extension cache)
    sources: tuple[str, ...]  # in csrc/
    first_build: str  # how long its first just-in-time build takes


# device type -> its part of the extension
PARTS = {
    "cpu": Part(
        "rgflow_fast._C", "rgflow_fast_cpu", ("rg_coupling.cpp", "rg_coupling_layer.cpp"), "about a minute"
    ),
    "cuda": Part("rgflow_fast._C_cuda", "rgflow_fast_cuda", ("rg_coupling_cuda.cu",), "about two minutes"),
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
    Loads or builds it on the first call (see the module docstring)."""
    return _load(part)


@functools.lru_cache(maxsize=None)
def _load(part: str) -> str | None:
    if part == "cuda":
        if torch.version.cuda is None:
            return "this torch is a CPU-only build; install a CUDA build of torch"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        reason = _load("cpu")
        if reason is not None:
            return f"it needs the CPU part of the extension, which cannot load: {reason}"
    spec = importlib.util.find_spec(PARTS[part].aot_module)
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
        return None
    return _build(part)


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
    if not _is_cached(part, src):
        print(
            f"rgflow_fast: building the {part.upper()} extension (first use only, "
            f"{PARTS[part].first_build}; cached in torch's extension folder)...",
            file=sys.stderr,
            flush=True,
        )
    flags = compile_args()
    try:
        cpp_extension.load(
            name=PARTS[part].jit_name,
            sources=[str(src / f) for f in PARTS[part].sources],
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


def _is_cached(part: str, src: Path) -> bool:
    """Whether a just-in-time build of ``part`` newer than its sources and the headers exists
    (only chooses whether the progress line is printed; torch decides what to rebuild)."""
    cpp_extension = _cpp_extension()
    name = PARTS[part].jit_name
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:  # a private helper of torch; if it moves, just print the line
        return False
    built = [p.stat().st_mtime for p in build_dir.glob(f"{name}*") if p.suffix in (".so", ".pyd")]
    inputs = [src / f for f in PARTS[part].sources] + list(src.glob("*.h"))
    newest_source = max((p.stat().st_mtime for p in inputs if p.is_file()), default=0.0)
    return bool(built) and max(built) >= newest_source
