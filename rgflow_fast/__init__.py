"""rgflow_fast: fast, exact RG-Flow (Hu, Wu, You, Olshausen, Chen, 2022).

    import rgflow_fast as rf
    model = rf.RGFlow(image_size=32, channels=3)
    z, ldj = model(x)                  # data -> latent, ldj = log|det dz/dx|
    x_back, inv_ldj = model.inverse(z)
    model = rf.load_model("runs/.../checkpoints/step_00004000.pt")   # a model trained by rgflow-fast train
    pixels = rf.transforms.to_pixels(model.sample(16))                # images in [0, 1]
    with rf.use_backend("torch"):      # the pure-PyTorch reference
        ...
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _register_source_kernels() -> None:
    # A source checkout keeps the Triton kernels in the top-level kernels/ folder; a wheel
    # installs them as rgflow_fast/kernels. Make `rgflow_fast.kernels` import the same way in both.
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels" / "__init__.py"
    if "rgflow_fast.kernels" in sys.modules or (here / "kernels").is_dir() or not source.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "rgflow_fast.kernels", source, submodule_search_locations=[str(source.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["rgflow_fast.kernels"] = module
    spec.loader.exec_module(module)


_register_source_kernels()

from . import analysis, functional, nn, transforms  # noqa: E402
from .backends import available_backends, current_backend, use_backend  # noqa: E402
from .checkpoint import load_model  # noqa: E402
from .model import RGFlow  # noqa: E402
from .original import from_original, to_original  # noqa: E402

__all__ = [
    "RGFlow",
    "load_model",
    "from_original",
    "to_original",
    "use_backend",
    "current_backend",
    "available_backends",
    "analysis",
    "functional",
    "nn",
    "transforms",
    "__version__",
]
