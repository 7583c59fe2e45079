"""The error of every ``rgflow-fast`` command."""
from __future__ import annotations

__all__ = ["RunError", "NonFiniteLoss"]


class RunError(Exception):
    """A command cannot run as asked; the message says why and what to do."""


class NonFiniteLoss(RunError):
    """Training stopped before a step that would have written NaN or inf weights."""
