"""Shared test fixtures.

On a machine without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be
set before Triton is first imported, so it is set here.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rgflow_fast as rf  # noqa: E402

# A model in the original RG-Flow code's checkpoint format and its outputs (fixtures/README.md).
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "original_rgflow_L16_c3_laplace.pt"

# Every backend other than the reference that loads here; op and model tests run on each.
FAST_BACKENDS = [b for b in rf.available_backends() if b != "torch"]
# Devices tests run on: the CPU always, CUDA when present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    return f"rgflow_fast backends: {rf.available_backends()}; devices: {DEVICES}"


@pytest.fixture
def seed(request):
    """A fresh seed per test run, printed so that a failure can be replayed
    (set RGFLOW_FAST_TEST_SEED to replay)."""
    value = int(os.environ.get("RGFLOW_FAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(value)
    print(f"seed={value} (replay with RGFLOW_FAST_TEST_SEED={value})")
    return value


@pytest.fixture(scope="session")
def fixture_data():
    """The original-format model and its outputs (see tests/fixtures/README.md)."""
    return torch.load(FIXTURE, weights_only=False)


def randomize_(model: torch.nn.Module, scale: float = 0.3, generator=None) -> torch.nn.Module:
    """Perturb every parameter (a fresh RG-Flow is the identity, which proves nothing)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
    return model


def skip_unless_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def assert_training_lowers_loss(loss_fn, module, channels, size, steps=4):
    """A few Adam steps on smooth random images (neighbouring pixels correlate, so there is
    structure to learn) must lower ``loss_fn(x)``."""
    x = torch.nn.functional.avg_pool2d(torch.randn(8, channels, size + 2, size + 2), 3, stride=1)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = loss_fn(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.fixture
def reference_one_thread():
    """The reference backend on one thread: the models of these tests are tiny, so one
    thread is faster than two, and stays fast while other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with rf.use_backend("torch"):
        yield
    torch.set_num_threads(threads)
