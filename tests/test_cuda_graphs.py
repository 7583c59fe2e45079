"""CUDA-graph capture of the training step (rgflow_fast.cuda_graphs): what it refuses, with
errors that say what to change (no GPU needed), and, on a GPU, that replays train exactly as
eager steps do and that other shapes are refused."""
import copy

import pytest
import torch

import rgflow_fast as rf
from rgflow_fast.cuda_graphs import capture_training_step

from conftest import randomize_

CUDA = torch.cuda.is_available()


def small_model(**kw):
    return rf.RGFlow(image_size=8, channels=1, kernel_size=2, n_layers=1, n_res_blocks=1, n_mlp=1,
                     hidden=8, **kw)


def test_memory_efficient_model_is_refused():
    model = small_model(memory_efficient=True)
    optimizer = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="memory_efficient=True cannot be captured"):
        capture_training_step(model, optimizer, torch.zeros(2, 1, 8, 8))


def test_optimizer_must_be_capturable():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), capturable=False)
    with pytest.raises(ValueError, match="capturable=True"):
        capture_training_step(model, optimizer, torch.zeros(2, 1, 8, 8))


def test_cpu_tensors_are_refused():
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="one CUDA device.*cpu"):
        capture_training_step(model, optimizer, torch.zeros(2, 1, 8, 8))


def _loss(model, x):
    return -model.log_prob(x).mean()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_replays_train_like_eager_steps(seed):
    eager = randomize_(small_model()).cuda()
    graphed = copy.deepcopy(eager)
    batches = [torch.randn(4, 1, 8, 8, device="cuda") for _ in range(4)]
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)
    step = capture_training_step(graphed, opt_g, batches[0], _loss, clip_grad_norm=1.0)
    for x in batches:
        opt_e.zero_grad()
        loss_e = _loss(eager, x)
        loss_e.backward()
        norm_e = torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        opt_e.step()
        loss_g, norm_g = (t.clone() for t in step(x))
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(norm_g, norm_e, rtol=1e-4, atol=1e-5)
    for p_e, p_g in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(p_g, p_e, rtol=1e-4, atol=1e-5)
    assert graphed.check_inputs  # restored after the capture


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_other_shapes_are_refused(seed):
    model = small_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), capturable=True)
    step = capture_training_step(model, optimizer, torch.randn(4, 1, 8, 8, device="cuda"), _loss)
    with pytest.raises(ValueError, match=r"captured for batches of shape \(4, 1, 8, 8\).*drop_last"):
        step(torch.randn(3, 1, 8, 8, device="cuda"))
