"""Training RG-Flow: the run config (:mod:`.config`), the loop (:mod:`.loop`), distributed
set-up (:mod:`.distributed`), the run folder and image outputs (:mod:`.outputs`) and
progress reporting (:mod:`.progress`).

Training is the published setup: AdamW (lr 1e-3, weight decay 5e-5), global grad-norm clip
1, loss = negative log-likelihood in nats per dimension (data transform included, see
:mod:`rgflow_fast.transforms`); bits/dim is logged.

A run folder holds ``config.json``, ``metrics.jsonl`` (one JSON object per logged step:
``step``, ``epoch``, ``bpd`` (train, mean since the previous record), ``grad_norm``, ``lr``,
``time`` (training seconds since the run began, summed over resumed sessions),
``images_per_s``, and ``test_bpd`` at checkpoints), ``bpd.png`` (the curve),
``samples/step_*.png`` (sample grids) and ``checkpoints/step_*.pt`` (the last ``keep``).
"""
from .config import PRESETS, RESUME_FIELDS, RunConfig, paper_temperature
from .errors import NonFiniteLoss, RunError
from .loop import RunOptions, evaluate, sample_temperature, train

__all__ = [
    "PRESETS", "RESUME_FIELDS", "RunConfig", "RunOptions", "RunError", "NonFiniteLoss", "train", "evaluate",
    "paper_temperature", "sample_temperature",
]
