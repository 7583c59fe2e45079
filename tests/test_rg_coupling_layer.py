"""The fused coupling layer, rg_coupling_layer (rgflow_fast/coupling_layer.py,
csrc/rg_coupling_layer.cpp): values and every gradient against the reference on random layer
shapes, forward and inverse, stored or recomputed activations; results independent of the
thread count; what the recompute mode keeps; the reuse of saved activations' blocks;
torch.compile and opcheck; input validation.

Tolerances against the float64/float32 reference: float64 within 1e-10 (relative to each
output's largest magnitude); float32 within 2e-4 of it (the tiled BLAS products sum in another
order than torch's, over up to 2·n_res·(n_mlp + 1) chained products).
The Triton kernels' own tests (precision modes, AOT) are in test_rg_coupling_layer_triton.py.
"""
import subprocess
import sys

import pytest
import torch

import rgflow_fast as rf
from conftest import FAST_BACKENDS
from rgflow_fast import coupling_layer
from rgflow_fast.model import CouplingLayer

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4}


def perturbed_layer(D, hidden, n_mlp, n_res, generator, dtype=torch.float32):
    """A coupling layer with σ, β, V, g, b all perturbed, so that no part is the identity."""
    layer = CouplingLayer(D, hidden, n_mlp, n_res).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return layer


def random_case(dtype, generator, small=False):
    """A random perturbed_layer, its input ``u (B·P, C, k, k)`` (non-contiguous) and running
    log-det ``ldj (B,)``."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    C, k = pick([1, 2, 3]), pick([2, 4])
    n_res, n_mlp = pick([0, 1, 2, 3, 4] if not small else [0, 1, 2]), pick([1, 2, 3])
    hidden = pick([3, 5, 13, 21] if small else [3, 13, 37, 61])
    B, P = pick([1, 2, 3]), pick([1, 3, 5, 7] if small else [1, 5, 21, 37])
    layer = perturbed_layer(C * k * k, hidden, n_mlp, n_res, generator, dtype)
    u = torch.randn(B * P, C, k, k, generator=generator, dtype=dtype).transpose(2, 3)
    ldj = torch.randn(B, generator=generator, dtype=dtype)
    return layer, u, ldj


def outputs_and_grads(fn, layer, u, ldj, inverse, recompute, generator_seed):
    params = layer.op_parameters()
    leaves = [u.detach().clone().requires_grad_(), ldj.detach().clone().requires_grad_()]
    y, l = fn(*leaves, params, layer.n_mlp, inverse, recompute)
    g = torch.Generator().manual_seed(generator_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in (y, l)]
    grads = torch.autograd.grad((y, l), leaves + params, cotangents)
    return [y, l, *grads]


def assert_close_scaled(got, expected, tol, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda m: f"{what}, output {i}: {m}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_matches_reference(seed, backend, dtype, inverse, recompute):
    g = torch.Generator().manual_seed(seed)
    # the Triton interpreter is slow: smaller layers there
    layer, u, ldj = random_case(dtype, g, small=backend == "triton")
    with rf.use_backend("torch"):
        expected = outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
    with rf.use_backend(backend):
        got = outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
    assert_close_scaled(got, expected, TOLERANCE[dtype], f"{backend}, {tuple(u.shape)}, {layer}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_inverse_undoes_forward(seed, backend):
    layer, u, ldj = random_case(torch.float64, torch.Generator().manual_seed(seed), small=True)
    params = layer.op_parameters()
    with rf.use_backend(backend), torch.no_grad():
        y, l = coupling_layer.rg_coupling_layer(u, ldj, params, layer.n_mlp)
        back, l0 = coupling_layer.rg_coupling_layer(y, l, params, layer.n_mlp, inverse=True)
    torch.testing.assert_close(back, u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l0, ldj, rtol=1e-12, atol=1e-12)


def cpp_available():
    if "cpp" not in rf.available_backends():
        pytest.skip("the C++ extension does not load here")
    return torch.ops.rgflow_fast


@pytest.mark.parametrize("rows, batch", [(1000, 8), (150, 6), (20, 4)])  # tiles of 64 rows; of 32; one
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_cpp_results_do_not_depend_on_thread_count_or_run(seed, rows, batch, inverse, recompute):
    cpp_available()
    g = torch.Generator().manual_seed(seed)
    # several tiles and gradient chunks; or a single tile, whose two nets run on two threads
    layer = perturbed_layer(48, 40, 2, 2, g)
    u, ldj = torch.randn(rows, 3, 4, 4, generator=g), torch.randn(batch, generator=g)
    threads = torch.get_num_threads()
    results = {}
    try:
        with rf.use_backend("cpp"):
            for n in (1, 2, 3, 1):
                torch.set_num_threads(n)
                results.setdefault(n, []).append(
                    outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
                )
    finally:
        torch.set_num_threads(threads)
    first = results[1][0]
    for run in results[1][1:] + results[2] + results[3]:
        assert all(torch.equal(a, b) for a, b in zip(run, first))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_cpp_gradient_chunks_of_several_tiles_match_reference(seed, dtype, inverse, recompute):
    """Over 8 tiles of rows, so that a parameter-gradient chunk holds several tiles (its first
    tile writes the dW sums, the next ones add to them); random_case stays below that."""
    ops = cpp_available()
    g = torch.Generator().manual_seed(seed)
    P = int(torch.randint(61, 120, (1,), generator=g))  # 9 · P rows: 9 to 17 tiles of 64
    layer = perturbed_layer(12, 13, 2, 2, g, dtype)
    u = torch.randn(9 * P, 3, 2, 2, generator=g, dtype=dtype)
    ldj = torch.randn(9, generator=g, dtype=dtype)
    with rf.use_backend("torch"):
        expected = outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
    kernels = ops.rg_coupling_layer_cpu_products() if dtype == torch.float32 else ["auto"]
    for products in kernels:
        with rf.use_backend("cpp"), pytest.MonkeyPatch.context() as m:
            m.setenv("RGFLOW_FAST_CPU_PRODUCTS", products)
            got = outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
        assert_close_scaled(got, expected, TOLERANCE[dtype], f"cpp ({products}), {9 * P} rows")


@pytest.mark.parametrize("products", ["avx2", "onednn", "blas"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_cpp_every_float_product_kernel_matches_reference(seed, monkeypatch, products, inverse, recompute):
    """Each kernel RGFLOW_FAST_CPU_PRODUCTS can choose (only the one "auto" picks runs in the
    other tests), on random shapes: ragged column panels, row counts off the register block."""
    ops = cpp_available()
    if products not in ops.rg_coupling_layer_cpu_products():
        pytest.skip(f"the {products!r} product kernel does not run on this machine")
    layer, u, ldj = random_case(torch.float32, torch.Generator().manual_seed(seed))
    with rf.use_backend("torch"):
        expected = outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
    monkeypatch.setenv("RGFLOW_FAST_CPU_PRODUCTS", products)
    with rf.use_backend("cpp"):
        got = outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, inverse, recompute, seed)
    assert_close_scaled(got, expected, TOLERANCE[torch.float32], f"{products}, {tuple(u.shape)}, {layer}")


def test_cpp_product_kernel_choice_is_checked(monkeypatch):
    ops = cpp_available()
    layer, u, ldj = random_case(torch.float32, torch.Generator().manual_seed(0), small=True)
    monkeypatch.setenv("RGFLOW_FAST_CPU_PRODUCTS", "fastest")
    with rf.use_backend("cpp"), pytest.raises(RuntimeError, match="must be 'auto', 'avx2', 'onednn' or 'blas'"):
        coupling_layer.rg_coupling_layer(u, ldj, layer.op_parameters(), layer.n_mlp)
    assert ops.rg_coupling_layer_cpu_products()[0] in ("avx2", "onednn", "blas")


def saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_cpp_recompute_saves_only_the_inputs(seed):
    cpp_available()
    layer = CouplingLayer(48, 64, 2, 3)
    params = layer.op_parameters()
    u, ldj = torch.randn(256, 3, 4, 4, requires_grad=True), torch.zeros(4)
    inputs = u.numel() * 4 + sum(p.numel() * 4 for p in params)
    with rf.use_backend("cpp"):
        stored, _ = saved_bytes(lambda: coupling_layer.rg_coupling_layer(u, ldj, params, 2))
        recomputed, _ = saved_bytes(lambda: coupling_layer.rg_coupling_layer(u, ldj, params, 2, recompute=True))
    assert recomputed == inputs
    # the stored activations: per row and step, x and per net z_0..z_R (D each) and the
    # hidden pre-activations (n_res · n_mlp · hidden)
    assert stored == inputs + 256 * 2 * (48 + 2 * (4 * 48 + 3 * 2 * 64)) * 4


def test_cpp_saved_activations_reuse_freed_blocks_within_the_peak(seed):
    """A training forward's saved activations take the block the last backward freed (no fresh
    pages), with the same results as on a fresh block; a new size frees kept blocks first, so
    live plus kept bytes stay within the most ever live; empty_activation_cache frees the rest."""
    cpp_available()
    from rgflow_fast import cpp_ops

    g = torch.Generator().manual_seed(seed)
    layer = perturbed_layer(48, 40, 2, 2, g)
    params = layer.op_parameters()

    def acts_bytes(rows):  # per row: both steps' x, z_0..z_2 per net, 2·2 hidden pre-activations
        return rows * 2 * (48 + 2 * (3 * 48 + 2 * 2 * 40)) * 4

    def step(u, ldj):
        return outputs_and_grads(coupling_layer.rg_coupling_layer, layer, u, ldj, False, False, seed)

    cpp_ops.empty_activation_cache()
    live = cpp_ops.activation_cache()["live"]  # other graphs still alive, normally none
    u1, u2 = torch.randn(2, 301, 3, 4, 4, generator=g)
    ldj = torch.randn(7, generator=g)
    with rf.use_backend("cpp"):
        step(u1, ldj)
        assert cpp_ops.activation_cache() == {"live": live, "kept": acts_bytes(301)}
        y, l = coupling_layer.rg_coupling_layer(u2.requires_grad_(), ldj, params, 2)
        assert cpp_ops.activation_cache() == {"live": live + acts_bytes(301), "kept": 0}
        del y, l
        reused = step(u2, ldj)
        assert cpp_ops.empty_activation_cache() == acts_bytes(301)
        fresh = step(u2, ldj)
        assert all(torch.equal(a, b) for a, b in zip(reused, fresh))
        y, l = coupling_layer.rg_coupling_layer(u2[:150], ldj[:6], params, 2)
        assert cpp_ops.activation_cache() == {"live": live + acts_bytes(150), "kept": 0}
        del y, l
    assert cpp_ops.activation_cache() == {"live": live, "kept": acts_bytes(150)}
    assert cpp_ops.empty_activation_cache() == acts_bytes(150)
    assert cpp_ops.activation_cache() == {"live": live, "kept": 0}


@pytest.mark.parametrize("recompute", [False, True])
def test_cpp_a_nan_in_one_call_does_not_reach_the_next(seed, recompute):
    """Work buffers and kept activation blocks are reused from call to call and layer to layer:
    a call on a NaN input (of a wider layer, whose buffers cover more) must leave nothing that a
    later call reads."""
    cpp_available()
    g = torch.Generator().manual_seed(seed)
    layer, wide = perturbed_layer(48, 40, 2, 1, g), perturbed_layer(48, 64, 2, 2, g)
    u, ldj = torch.randn(150, 3, 4, 4, generator=g), torch.randn(6, generator=g)

    def step(layer, x):
        return outputs_and_grads(coupling_layer.rg_coupling_layer, layer, x, ldj, False, recompute, seed)

    with rf.use_backend("cpp"):
        clean = step(layer, u)
        assert all(t.isnan().any() for t in step(wide, torch.full_like(u, float("nan")))[:1])
        again = step(layer, u)
    assert all(t.isfinite().all() for t in clean)
    assert all(torch.equal(a, b) for a, b in zip(clean, again))


def test_activation_cache_queries_neither_build_nor_load_the_extension():
    code = ("import torch; from rgflow_fast import cpp_ops; "
            "print(cpp_ops.activation_cache() == {'live': 0, 'kept': 0}, cpp_ops.empty_activation_cache(), "
            "hasattr(torch.ops.rgflow_fast, 'rg_coupling_layer'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "0", "False"]


def test_cpp_no_grad_saves_nothing(seed):
    cpp_available()
    layer = CouplingLayer(12, 8, 1, 1)
    u, ldj = torch.randn(10, 3, 2, 2), torch.zeros(2)
    with rf.use_backend("cpp"), torch.no_grad():
        saved, (y, l) = saved_bytes(lambda: coupling_layer.rg_coupling_layer(u, ldj, layer.op_parameters(), 1))
    assert saved == 0 and y.grad_fn is None


def test_cpp_torch_compile_of_the_model_matches_eager(seed):
    cpp_available()
    model = rf.RGFlow(16, 2, n_layers=[2, 1, 1], n_res_blocks=1, n_mlp=1, hidden=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 2, 16, 16)
    params = list(model.parameters())
    with rf.use_backend("cpp"):
        expected = model.log_prob(x)
        expected_grads = torch.autograd.grad(expected.sum(), params)
        compiled = torch.compile(model.log_prob, backend="aot_eager", fullgraph=True)
        got = compiled(x)
        got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpp_opcheck(seed):
    ops = cpp_available()
    layer = CouplingLayer(12, 5, 1, 1).double()
    params = layer.op_parameters()
    u, ldj = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True), torch.randn(2, dtype=torch.float64)
    torch.library.opcheck(ops.rg_coupling_layer, (u, ldj, params, 1, False, False))
    torch.library.opcheck(ops.rg_coupling_layer, (u, ldj, params, 1, True, True))
    detached = [p.detach() for p in params]
    y, l, acts = ops.rg_coupling_layer_forward(u.detach(), ldj, detached, 1, False, True)
    inner = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.rg_coupling_layer_forward, (u.detach(), ldj, detached, 1, False, True), test_utils=inner)
    for saved in (acts, acts.new_empty(0)):
        args = (u.detach(), saved, detached, torch.randn_like(y), torch.randn_like(l), 1, False)
        torch.library.opcheck(ops.rg_coupling_layer_backward, args, test_utils=inner)


def test_cpp_runs_float32_and_float64_and_hands_other_dtypes_to_the_reference(seed):
    cpp_available()
    layer = CouplingLayer(12, 5, 1, 1).to(torch.bfloat16)
    u, ldj = torch.randn(4, 3, 2, 2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.bfloat16)
    with torch.no_grad():
        with rf.use_backend("cpp"):
            got = coupling_layer.rg_coupling_layer(u, ldj, layer.op_parameters(), 1)
        with rf.use_backend("torch"):
            expected = coupling_layer.rg_coupling_layer(u, ldj, layer.op_parameters(), 1)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_validation_says_what_is_wrong():
    layer = CouplingLayer(12, 5, 2, 1)
    params = layer.op_parameters()
    u, ldj = torch.randn(6, 3, 2, 2), torch.zeros(2)
    with pytest.raises(ValueError, match=r"2·\(4·n_res_blocks·\(n_mlp \+ 1\) \+ 1\) tensors"):
        coupling_layer.rg_coupling_layer(u, ldj, params[:-1], 2)
    with pytest.raises(ValueError, match="N = B·P"):
        coupling_layer.rg_coupling_layer(u, torch.zeros(4), params, 2)
    with pytest.raises(ValueError, match=r"S net parameter 1 must have shape \(5, 12\)"):
        coupling_layer.rg_coupling_layer(u, ldj, [params[0], params[1].T] + params[2:], 2)
    with pytest.raises(ValueError, match="move the nets"):
        coupling_layer.rg_coupling_layer(u.double(), ldj.double(), params, 2)
    with pytest.raises(ValueError, match="n_mlp must be a positive int"):
        coupling_layer.rg_coupling_layer(u, ldj, params, 0)
    with pytest.raises(ValueError, match=r"patch tensor \(N, C, k, k\)"):
        coupling_layer.rg_coupling_layer(u.reshape(6, 12), ldj, params, 2)
    with pytest.raises(TypeError, match="must be bools"):
        coupling_layer.rg_coupling_layer(u, ldj, params, 2, inverse=1)


def test_direct_cpp_op_calls_check_their_inputs():
    ops = cpp_available()
    layer = CouplingLayer(12, 5, 1, 1)
    params = layer.op_parameters()
    u, ldj = torch.randn(6, 3, 2, 2), torch.zeros(2)
    with pytest.raises(RuntimeError, match="float32 or float64 only"):
        ops.rg_coupling_layer(u.half(), ldj.half(), [p.half() for p in params], 1, False, False)
    with pytest.raises(RuntimeError, match="N = B·P"):
        ops.rg_coupling_layer(u, torch.zeros(4), params, 1, False, False)
    with pytest.raises(RuntimeError, match="do not match D"):
        ops.rg_coupling_layer(u, ldj, [params[0], params[1].T.contiguous()] + params[2:], 1, False, False)


def test_precision_is_checked_and_the_exact_backends_compute_in_the_dtype(seed):
    with pytest.raises(ValueError, match="precision must be one of"):
        rf.RGFlow(8, 1, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=4, precision="fp16")
    model = rf.RGFlow(8, 1, n_layers=1, n_res_blocks=1, n_mlp=1, hidden=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 1, 8, 8)
    for backend in ["torch"] + [b for b in FAST_BACKENDS if b == "cpp"]:
        with rf.use_backend(backend), torch.no_grad():
            model.precision = "fp32"
            exact = model(x)
            model.precision = "bf16"
            assert all(block.precision == "bf16" for block in model.blocks)
            assert all(torch.equal(a, b) for a, b in zip(model(x), exact))
    with pytest.raises(ValueError, match="precision must be one of"):
        model.precision = "half"
    layer = CouplingLayer(12, 5, 1, 1)
    with pytest.raises(ValueError, match="precision must be one of"):
        coupling_layer.rg_coupling_layer(torch.randn(2, 3, 2, 2), torch.zeros(1), layer.op_parameters(), 1, precision="x")
