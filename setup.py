"""Package layout: `rgflow_fast/` plus the top-level `kernels/` folder, which ships as
`rgflow_fast.kernels` (the name `kernels` alone belongs to another PyPI project)."""
from setuptools import setup

setup(
    packages=["rgflow_fast", "rgflow_fast.interop", "rgflow_fast.kernels"],
    package_dir={"rgflow_fast": "rgflow_fast", "rgflow_fast.kernels": "kernels"},
)
