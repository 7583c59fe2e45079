"""Autograd memory: our ops and adapters free a forward pass's graph as soon as its outputs are
dropped, as torch's own layers do, and many forward calls with grad enabled and no backward
(FrEIA's numerical-Jacobian pattern) keep memory flat.

Two measures. (1) Exact: every tensor autograd saves for backward is tracked through a
saved-tensors hook by a weak reference to a detached alias (holding the tensor itself would
make a cycle through the graph of a saved output), with the cyclic garbage collector off: a
reference cycle through a saved tensor or a context object would keep the graph, and so the
alias, alive. (2) Resident memory of a fresh process over a few hundred calls, with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed blocks instead of keeping them.
"""
import contextlib
import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from torch import nn

import rgflow_fast as rf

from conftest import FAST_BACKENDS, randomize_

BACKENDS = ["torch"] + FAST_BACKENDS


@contextlib.contextmanager
def tracked_saved_tensors():
    """Yields a function returning how many tensors saved for backward inside the block are
    still alive; the cyclic garbage collector is off inside."""
    refs = []

    def pack(tensor):
        alias = tensor.detach()
        refs.append(weakref.ref(alias))
        return alias

    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda alias: alias):
            yield lambda: (sum(r() is not None for r in refs), len(refs))
    finally:
        if enabled:
            gc.enable()


def small_model(L=8, C=2, dtype=torch.float32, **kw):
    return randomize_(rf.RGFlow(L, C, kernel_size=4, n_layers=2, n_res_blocks=1, n_mlp=1, hidden=8, **kw).to(dtype))


def assert_graphs_freed(run, x, calls=3):
    """``run(x)`` returns tensors that carry a graph; once they are dropped nothing it saved
    may stay alive. One untracked call first: a first call compiles and caches (Triton's
    interpreter, for one, leaves cyclic garbage then), which is a one-time cost, not growth."""
    run(x)
    gc.collect()
    with tracked_saved_tensors() as alive:
        for i in range(calls):
            outputs = run(x + 1e-3 * i)
            assert any(o.grad_fn is not None for o in outputs), "the call recorded no graph"
            assert alive()[0] > 0
            del outputs
            assert alive()[0] == 0, f"call {i}: {alive()[0]} of {alive()[1]} saved tensors still alive"


def test_tracking_sees_a_graph_kept_alive():
    # The measure itself: a graph held by a reference cycle (a Python object that is part of
    # the graph and refers to its output) is reported.
    layer = nn.Linear(4, 4)
    with tracked_saved_tensors() as alive:
        y = torch.tanh(layer(torch.randn(3, 4)))
        holder = {"y": y}
        holder["self"] = holder
        del y, holder
        assert alive()[0] > 0
    gc.collect()


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_and_coupling_free_their_graphs(seed, backend):
    model = small_model()
    light = small_model(memory_efficient=True)
    coupling = rf.nn.CheckerboardAffineCoupling(nn.Conv2d(2, 4, 3, padding=1), parity=0)
    x = torch.randn(2, 2, 8, 8)
    with rf.use_backend(backend):
        assert_graphs_freed(model, x)
        assert_graphs_freed(model.inverse, x)
        assert_graphs_freed(light, x)  # invertible backprop: a Python autograd.Function with modules on ctx
        assert_graphs_freed(coupling, x)
        assert_graphs_freed(lambda v: coupling.inverse(v, None), x)


def test_adapters_free_their_graphs(seed):
    model = small_model()
    x = torch.randn(2, 2, 8, 8)
    runs = []
    try:
        import FrEIA.framework as Ff

        from rgflow_fast.interop.freia import RGFlowBlock

        nodes = [Ff.InputNode(2, 8, 8)]
        nodes.append(Ff.Node(nodes[-1], RGFlowBlock, {"model": model}))
        nodes.append(Ff.OutputNode(nodes[-1]))
        runs.append(Ff.GraphINN(nodes))
    except ImportError:
        pass
    try:
        import normflows as nf

        from rgflow_fast.interop.normflows import RGFlowLayer, RGFlowPrior

        flow = nf.NormalizingFlow(RGFlowPrior(model), [RGFlowLayer(model)])
        runs.append(lambda v: (flow.log_prob(v),))
    except ImportError:
        pass
    try:
        from nflows.flows.base import Flow

        from rgflow_fast.interop.nflows import RGFlowDistribution, RGFlowTransform

        nflow = Flow(RGFlowTransform(model), RGFlowDistribution(model))
        runs.append(lambda v: (nflow.log_prob(v),))
    except ImportError:
        pass
    if not runs:
        pytest.skip("no flow library installed (pip install 'rgflow-fast[interop]')")
    for run in runs:
        assert_graphs_freed(run, x)


RSS_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import rgflow_fast as rf
    torch.set_num_threads(1)
    torch.manual_seed(0)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    model = rf.RGFlow(16, 1, kernel_size=4, n_layers=2, n_res_blocks=1, n_mlp=1, hidden=16)
    try:  # FrEIA's graph, as its numerical-Jacobian check runs it
        import FrEIA.framework as Ff
        from rgflow_fast.interop.freia import RGFlowBlock
        nodes = [Ff.InputNode(1, 16, 16)]
        nodes.append(Ff.Node(nodes[-1], RGFlowBlock, {"model": model}))
        nodes.append(Ff.OutputNode(nodes[-1]))
        inn = Ff.GraphINN(nodes)
        forward = lambda v: inn(v, jac=False)[0]
    except ImportError:
        forward = lambda v: model(v)[0]
    x = torch.randn(2, 1, 16, 16)
    flat = x.reshape(2, -1)
    h = 1e-4
    for i in range(int(sys.argv[1])):
        if i == 50:
            start = rss_mib()
        offset = torch.zeros_like(flat)
        offset[:, i % flat.shape[1]] = h
        upper = forward((flat + offset).view_as(x))
        lower = forward((flat - offset).view_as(x))
        column = (upper - lower).reshape(2, -1) / (2 * h)
        assert column.requires_grad
    print(start, rss_mib())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_stays_flat_over_many_forward_calls_with_grad():
    """FrEIA's numerical Jacobian: two forward calls per input dimension, grad enabled, no
    backward. A forward graph of this 1×16×16 model holds ~1.7 MB, so a graph kept per call
    would add ~700 MB over the 400 calls measured."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "250"], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    start, end = map(float, result.stdout.split()[-2:])
    assert end - start < 25, f"resident memory grew from {start:.0f} MiB to {end:.0f} MiB over 400 calls"
