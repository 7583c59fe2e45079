"""Package layout: `rgflow_fast/` plus the top-level `kernels/` folder, which ships as
`rgflow_fast.kernels` (the name `kernels` alone belongs to another PyPI project), and the
C++/CUDA sources in `csrc/`, which ship as `rgflow_fast/csrc` so that an installed package can
build its extension just in time on first use (see rgflow_fast/_extension.py).

Ahead-of-time build of the extension, against the torch already installed:

    RGFLOW_FAST_BUILD_EXT=1 pip install --no-build-isolation .

builds `rgflow_fast._C` (CPU kernels) and, when torch is a CUDA build and nvcc is found
(`$CUDA_HOME/bin/nvcc`), `rgflow_fast._C_cuda` (CUDA kernels); `RGFLOW_FAST_BUILD_EXT=cpu`
builds the CPU part only. Without the variable nothing is compiled and no compiler is needed.
"""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def extension_build():
    """``ext_modules`` and ``cmdclass`` of the ahead-of-time build, or empty ones."""
    request = os.environ.get("RGFLOW_FAST_BUILD_EXT", "").strip().lower()
    if request in ("", "0"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        raise RuntimeError(
            "RGFLOW_FAST_BUILD_EXT=1 builds the extension against the installed torch, which "
            "pip's isolated build environment cannot see: install torch first, then run "
            "RGFLOW_FAST_BUILD_EXT=1 pip install --no-build-isolation ."
        ) from exc
    # the same parts, sources and flags as the just-in-time build (rgflow_fast/_extension.py
    # imports only torch)
    spec = importlib.util.spec_from_file_location("_rgflow_fast_extension", HERE / "rgflow_fast" / "_extension.py")
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    flags = extension.compile_args()
    parts = extension.PARTS
    modules = [
        cpp_extension.CppExtension(
            parts["cpu"].aot_module,
            [f"csrc/{f}" for f in parts["cpu"].sources],
            include_dirs=[str(HERE / "csrc")],
            extra_compile_args={"cxx": flags["cxx"]},
            extra_link_args=flags["ld"],
        )
    ]
    home = cpp_extension.CUDA_HOME
    wants_cuda = request != "cpu" and torch.version.cuda is not None
    if wants_cuda and home is not None and (Path(home) / "bin" / "nvcc").exists():
        if not (Path(home) / "include" / "cuda_runtime.h").is_file():
            raise RuntimeError(
                f"CUDA_HOME={home} is not a CUDA toolkit (no include/cuda_runtime.h; torch guesses it "
                f"from the nvcc on PATH, which may be a wrapper script): set CUDA_HOME to the toolkit "
                f"folder, the one with bin/nvcc and lib64/libcudart.so"
            )
        modules.append(
            cpp_extension.CUDAExtension(
                parts["cuda"].aot_module,
                [f"csrc/{f}" for f in parts["cuda"].sources],
                include_dirs=[str(HERE / "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": flags["nvcc"]},
            )
        )
    return {"ext_modules": modules, "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    packages=["rgflow_fast", "rgflow_fast.interop", "rgflow_fast.training", "rgflow_fast.commands",
              "rgflow_fast.kernels", "rgflow_fast.csrc"],
    package_dir={"rgflow_fast": "rgflow_fast", "rgflow_fast.kernels": "kernels", "rgflow_fast.csrc": "csrc"},
    package_data={"rgflow_fast.csrc": ["*.h", "*.cpp", "*.cu"]},
    **extension_build(),
)
