"""Floors for the benchmarks: exact byte and FLOP models, device peaks, measured ceilings.

A benchmark's floor is the larger of ``bytes / bandwidth`` and ``flops / peak_rate``; the
fraction of the roofline a run reaches is ``floor / measured time``.

Byte models count the fewest bytes an op must move through memory: each input element it
needs read once, each output element written once. Sizes, for an image ``(B, C, L, L)``
and a block with kernel ``k``, dilation ``d`` (``P = (L/(k*d))**2`` patches):

    image   = B*C*L*L                 elements of the image
    patches = B*P*C*k*k               elements of the patch tensor (= image / d**2)
    half    = patches / 2             transformed elements of one checkerboard step

FLOP models count the conditioner MLPs' matmuls exactly (``2*in*out`` per linear per patch
row); the elementwise work beside them is a few FLOPs per element and is left out.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import torch

from rgflow_fast.geometry import block_specs, check_patch_geometry

__all__ = [
    "OpShape",
    "device_name",
    "OP_BYTES",
    "op_bytes",
    "model_forward_flops",
    "model_flops",
    "DevicePeak",
    "GPU_PEAKS",
    "known_peak",
    "matmul_precision",
    "measure_copy_gbps",
    "measure_matmul_tflops",
    "roofline",
]


@dataclass(frozen=True)
class OpShape:
    """One RG op's problem: image ``(batch, channels, image_size, image_size)`` of ``dtype``,
    block ``(kernel_size, dilation, offset)``."""

    batch: int
    channels: int
    image_size: int
    kernel_size: int
    dilation: int
    offset: int
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        check_patch_geometry(self.image_size, self.kernel_size, self.dilation, self.offset)

    @property
    def image(self) -> int:
        return self.batch * self.channels * self.image_size**2

    @property
    def patches(self) -> int:
        m = self.image_size // (self.kernel_size * self.dilation)
        return self.batch * m * m * self.channels * self.kernel_size**2

    @property
    def half(self) -> int:
        # k is even, so a checkerboard step transforms exactly half of every patch
        return self.patches // 2

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


# Elements each op must read + write (the ldj's B floats are counted too).
#   gather:            read the patch pixels of x, write the patch tensor
#   scatter:           out-of-place: read patches and the untouched pixels of x, write all of out
#   coupling_forward:  read all of x (untransformed pixels are copied to the new image), read s, t
#                      at transformed positions, write all of y, write ldj (B)
#   coupling_inverse:  the same as forward, with y and x swapped
#   coupling_backward: read grad_y (all), grad_ldj (B), x and s at transformed positions
#                      (dy/dt = 1 needs no t); write grad_x (all) and grad_s, grad_t in full
#                      (dense (B*P, C, k, k) tensors, zero where not transformed)
OP_BYTES = {
    "gather": lambda o: 2 * o.patches,
    "scatter": lambda o: o.patches + (o.image - o.patches) + o.image,
    "coupling_forward": lambda o: o.image + 2 * o.half + o.image + o.batch,
    "coupling_inverse": lambda o: o.image + 2 * o.half + o.image + o.batch,
    "coupling_backward": lambda o: o.image + o.batch + 2 * o.half + o.image + 2 * o.patches,
}


def op_bytes(op: str, shape: OpShape) -> int:
    """Fewest bytes op ``op`` (a key of :data:`OP_BYTES`) moves on ``shape``."""
    if op not in OP_BYTES:
        raise ValueError(f"unknown op {op!r}; choose one of {sorted(OP_BYTES)}")
    return OP_BYTES[op](shape) * shape.itemsize


def model_forward_flops(config: dict, batch: int) -> int:
    """Matmul FLOPs of one forward (or inverse) pass of an RG-Flow with ``config``
    (:attr:`rgflow_fast.RGFlow.config`) on ``batch`` images.

    Per block: ``batch*P`` patch rows, ``n_layers`` layers of 2 checkerboard steps, each
    running 2 nets (s and t) of ``n_res_blocks`` residual MLPs with widths
    ``[C*k*k, hidden x n_mlp, C*k*k]``; a linear costs ``2*in*out`` per row.
    """
    k, c = config["kernel_size"], config["channels"]
    features = c * k * k
    total = 0
    for spec in block_specs(config["image_size"], k):
        h = spec.level
        widths = [features] + [config["hidden"][h]] * config["n_mlp"][h] + [features]
        per_row_mlp = sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
        per_row = config["n_layers"][h] * 2 * 2 * config["n_res_blocks"][h] * per_row_mlp
        total += batch * spec.num_patches * per_row
    return total


# forward, inverse: one pass; a training step: forward + backward (grads of inputs and
# weights, each one matmul per forward matmul) = 3 passes.
_PASSES = {"log_prob": 1, "sample": 1, "train_step": 3}


def model_flops(case: str, config: dict, batch: int) -> int:
    """Matmul FLOPs of model case ``case`` ("log_prob", "sample" or "train_step")."""
    if case not in _PASSES:
        raise ValueError(f"unknown model case {case!r}; choose one of {sorted(_PASSES)}")
    return _PASSES[case] * model_forward_flops(config, batch)


@dataclass(frozen=True)
class DevicePeak:
    """Datasheet peaks: memory bandwidth (GB/s) and dense (no sparsity) TFLOP/s per math mode."""

    name: str
    bandwidth_gbps: float
    tflops: dict


# Most specific substring first: torch.cuda.get_device_name() gives e.g. "NVIDIA H100 80GB HBM3"
# (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL".
GPU_PEAKS = (
    DevicePeak("H100 PCIe", 2000.0, {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    DevicePeak("H100 NVL", 3900.0, {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    DevicePeak("H200 NVL", 4800.0, {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    DevicePeak("H200", 4800.0, {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    DevicePeak("H100", 3350.0, {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
)


def known_peak(device_name: str) -> DevicePeak | None:
    """The datasheet peak whose key is a substring of ``device_name``, or None."""
    for peak in GPU_PEAKS:
        if peak.name.lower() in device_name.lower():
            return peak
    return None


def matmul_precision(dtype: torch.dtype, device_type: str) -> str:
    """Math mode a matmul in ``dtype`` runs in: "bf16", "fp16", "tf32", "fp32" or "fp64"."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float64:
        return "fp64"
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, repeats):
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_copy_gbps(device, megabytes: int = 256, repeats: int = 7) -> float:
    """STREAM-like copy: ``dst.copy_(src)`` on two float32 buffers of ``megabytes`` each,
    counting bytes read + written; median of ``repeats``. Buffers far larger than the caches."""
    device = torch.device(device)
    n = megabytes * 2**20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * n * 4 / seconds / 1e9


def measure_matmul_tflops(device, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> float:
    """Rate of an ``n x n`` matmul in ``dtype`` (``2*n**3`` FLOPs), median of ``repeats``.

    On the CPU the fastest of torch's matmul (MKL or OpenBLAS) and oneDNN's (the library torch
    ships for its mkldnn ops), on the square product and on the model's own shape (1024 rows
    by a 128 × 128 weight): on some CPUs MKL runs generic code (an AMD EPYC with AVX-512: 107
    GFLOP/s against oneDNN's 227 on one thread), on others the square product is the slower
    one (an AVX2 EPYC: 74 against 89), and a floor from the slower rate would be no floor."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: a @ b, device, repeats)
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        a_dnn, bt_dnn = a.to_mkldnn(), b.t().contiguous().to_mkldnn()
        seconds = min(seconds, _median_seconds(lambda: torch._C._nn.mkldnn_linear(a_dnn, bt_dnn, None), device, repeats))
    rate = 2 * n**3 / seconds / 1e12
    if device.type == "cpu":
        rows, w = torch.rand(1024, 128, dtype=dtype), torch.rand(128, 128, dtype=dtype)
        reps = 64  # one product is ~40 µs: time a batch of them
        seconds = _median_seconds(lambda: [rows @ w for _ in range(reps)], device, repeats)
        rate = max(rate, 2 * 1024 * 128 * 128 * reps / seconds / 1e12)
    return rate


def roofline(seconds: float, *, nbytes: int | None = None, flops: int | None = None,
             bandwidth_gbps: float | None = None, peak_tflops: float | None = None) -> dict:
    """Achieved rates, the floor and the fraction of it reached by a run of ``seconds``.

    Returns ``gbps`` and/or ``tflops`` (achieved), ``floor_ms = max(bytes/bandwidth,
    flops/peak)`` over the terms given, ``bound`` ("memory" or "compute", whichever term
    is larger) and ``roofline_fraction = floor / seconds``.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive; got {seconds}")
    out = {}
    terms = {}
    if nbytes is not None:
        out["bytes"] = nbytes
        out["gbps"] = nbytes / seconds / 1e9
        if bandwidth_gbps:
            terms["memory"] = nbytes / (bandwidth_gbps * 1e9)
    if flops is not None:
        out["flops"] = flops
        out["tflops"] = flops / seconds / 1e12
        if peak_tflops:
            terms["compute"] = flops / (peak_tflops * 1e12)
    if terms:
        bound = max(terms, key=terms.get)
        out["bound"] = bound
        out["floor_ms"] = terms[bound] * 1e3
        out["roofline_fraction"] = terms[bound] / seconds
    return out
