"""GPU benchmarks of the fused Triton coupling layer (rgflow_fast.triton_layer), per precision
mode, beside the reference:

- ``layer_fwd`` / ``layer_fwd_bwd``: one ``rg_coupling_layer`` call at the paper config
  (C=3, k=4: D=48; hidden 512, 4 residual blocks, n_mlp 2) on the level-0 patch rows of a
  batch of 64 and of 512 32×32 images (N = 64·batch rows);
- ``train_step``: the paper model's training step (``-log_prob(x).mean()``, backward, grad-norm
  clip 1, AdamW lr 1e-3 / weight decay 5e-5) at batch 64 and 512, eager and replayed as a CUDA
  graph (:func:`rgflow_fast.cuda_graphs.capture_training_step`).

Variants: ``torch`` (the reference, fp32 products), ``torch+tf32`` (the reference with TF32
matmuls: the baseline for the TF32 mode), ``torch_compile`` (layer cases), ``triton-<mode>``
for mode fp32 / tf32 / bf16, and ``+graph`` for the captured step. Every variant is checked
against the reference (relative max-norm error within its mode's tolerance) before it is
timed. The model-level precision is ``rf.RGFlow(..., precision=mode)``; until the model takes
that argument the triton step cases skip saying so. GPU only: without CUDA the module skips.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import rgflow_fast as rf
from rgflow_fast.coupling_layer import reference_layer

import floors
import harness as bench

if bench.DEVICE.type != "cuda":
    pytest.skip("the fused layer's benchmarks need a CUDA device", allow_module_level=True)

tlay = pytest.importorskip("rgflow_fast.triton_layer")

C, K, HIDDEN, N_RES, N_MLP = 3, 4, 512, 4, 2
D = C * K * K
PATCHES = (32 // K) ** 2  # level-0 patches of a 32×32 image
BATCHES = (64, 512)
# relative max-norm error allowed before timing (see rgflow_fast.triton_layer's tolerances)
TOL = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 4e-2}
LR, WEIGHT_DECAY, CLIP = 1e-3, 5e-5, 1.0
LAYER_VARIANTS = ["torch", "torch+tf32", "torch_compile", "triton-fp32", "triton-tf32", "triton-bf16"]
STEP_VARIANTS = ["torch", "torch+tf32", "torch+graph", "triton-fp32", "triton-fp32+graph",
                 "triton-tf32", "triton-tf32+graph", "triton-bf16", "triton-bf16+graph"]


@contextlib.contextmanager
def tf32(enabled: bool):
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _mode(variant):
    """(math mode for the roofline, triton precision or None, TF32 reference?)."""
    if variant.startswith("triton-"):
        p = variant.split("-")[1].split("+")[0]
        return p, p, False
    return ("tf32", None, True) if "tf32" in variant else ("fp32", None, False)


def _layer_flops(rows, passes):
    per_row = 2 * 2 * N_RES * sum(2 * a * b for a, b in zip([D] + [HIDDEN] * N_MLP, [HIDDEN] * N_MLP + [D]))
    return passes * per_row * rows


def _set_roofline(benchmark, math_mode, flops):
    """Recompute ``extra_info``'s roofline with the variant's own math mode (the harness picks
    it from the dtype and the global TF32 flag)."""
    info = bench.device_info()
    if benchmark.stats is None:
        return
    peak = info["peak_tflops"].get(math_mode)
    benchmark.extra_info.update(floors.roofline(benchmark.stats.stats.median, flops=flops,
                                                peak_tflops=peak))
    benchmark.extra_info["math_mode"] = math_mode


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def layer_params(generator):
    widths = [D] + [HIDDEN] * N_MLP + [D]
    params = []
    for _ in range(2):
        for _ in range(N_RES):
            for w_in, w_out in zip(widths[:-1], widths[1:]):
                params += [1 + 0.3 * torch.randn(w_in, generator=generator),
                           torch.randn(w_out, w_in, generator=generator) * (2.81 / w_in) ** 0.5,
                           1 + 0.2 * torch.randn(w_out, 1, generator=generator),
                           0.1 * torch.randn(w_out, generator=generator)]
        params.append(0.5 * torch.randn(D, generator=generator))
    return [p.to(bench.DEVICE).requires_grad_() for p in params]


@pytest.mark.parametrize("variant", LAYER_VARIANTS)  # innermost: the reference runs first
@pytest.mark.parametrize("case", ["layer_fwd", "layer_fwd_bwd"])
@pytest.mark.parametrize("batch", BATCHES)
def test_layer(benchmark, batch, case, variant):
    g = torch.Generator().manual_seed(0)
    params = layer_params(g)
    u = torch.randn(batch * PATCHES, C, K, K, generator=g).to(bench.DEVICE).requires_grad_()
    ldj = torch.zeros(batch, device=bench.DEVICE, requires_grad=True)
    math_mode, precision, use_tf32 = _mode(variant)
    if precision is not None:
        reason = tlay.unsupported_reason(u, params, N_MLP, precision)
        if reason:
            pytest.skip(reason)
        layer = lambda *a: tlay.rg_coupling_layer(*a, precision=precision)  # noqa: E731
    elif variant == "torch_compile":
        layer = torch.compile(reference_layer)
    else:
        layer = reference_layer
    backward = case == "layer_fwd_bwd"

    def fn():
        with tf32(use_tf32):
            y, out_ldj = layer(u, ldj, params, N_MLP, False, False)
            if backward:
                grads = torch.autograd.grad((y.sum() + out_ldj.sum()), [u, *params])
                return y, grads
            return y, ()

    with torch.no_grad() if not backward else contextlib.nullcontext():
        got = fn()
        with tf32(False):
            want = (reference_layer(u, ldj, params, N_MLP, False, False)[0],)
        err = _rel_err(got[0], want[0])
    assert err < TOL.get(math_mode, 1e-4), f"{variant}: relative error {err:.2e}"
    run = fn if backward else torch.no_grad()(fn)
    bench.run_case(benchmark, run, name=f"{case}[paper,B={batch}]", backend=variant, size=f"N={u.shape[0]}",
                   dtype=torch.float32, flops=_layer_flops(u.shape[0], 3 if backward else 1))
    _set_roofline(benchmark, math_mode, _layer_flops(u.shape[0], 3 if backward else 1))


def _model(precision):
    kwargs = dict(image_size=32, channels=3)
    if precision is not None:
        try:
            return rf.RGFlow(**kwargs, precision=precision)
        except TypeError:
            pytest.skip("rf.RGFlow takes no precision= yet (the model-level hook of the fused layer)")
    return rf.RGFlow(**kwargs)


def _optimizer(model, graph):
    kwargs = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    if graph:
        return torch.optim.AdamW(model.parameters(), capturable=True, **kwargs)
    return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)


@pytest.mark.parametrize("variant", STEP_VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_train_step(benchmark, batch, variant):
    from rgflow_fast.cuda_graphs import capture_training_step

    math_mode, precision, use_tf32 = _mode(variant)
    graph = variant.endswith("+graph")
    backend = "triton" if precision is not None else "torch"
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=bench.DEVICE)
    try:
        with rf.use_backend(backend), tf32(use_tf32):
            model = _model(precision).to(bench.DEVICE)
            bench.require_backend(backend, x)
            with torch.no_grad():
                for p in model.parameters():  # away from the identity initialisation
                    p.add_(0.02 * torch.randn_like(p))
            reference = None
            if precision is not None or use_tf32:
                with rf.use_backend("torch"), tf32(False), torch.no_grad():
                    reference = -model.log_prob(x).mean()
            optimizer = _optimizer(model, graph)

            def loss_fn(m, batch_x):
                return -m.log_prob(batch_x).mean()

            if graph:
                step = capture_training_step(model, optimizer, x, loss_fn, clip_grad_norm=CLIP)
                fn = lambda: step(x)[0]  # noqa: E731
            else:
                def fn():
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(model, x)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
                    optimizer.step()
                    return loss

            if reference is not None:
                with torch.no_grad():
                    err = _rel_err(-model.log_prob(x).mean(), reference)
                assert err < TOL[math_mode], f"{variant}: loss relative error {err:.2e}"
            flops = floors.model_flops("train_step", model.config, batch)
            bench.run_case(benchmark, fn, name=f"train_step[paper_celeba,B={batch}]", backend=variant,
                           size=f"B={batch}", dtype=torch.float32, flops=flops)
            _set_roofline(benchmark, math_mode, flops)
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"{variant} at batch {batch} does not fit on this GPU: {exc}".splitlines()[0])
