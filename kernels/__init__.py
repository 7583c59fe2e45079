"""Triton kernels of rgflow_fast, one module per kernel family (installed as
``rgflow_fast.kernels``). Importing this package does not import Triton."""
