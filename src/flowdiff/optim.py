"""Learning-rate schedules that Hydra configs build with ``_partial_: true`` (``optimizer -> scheduler``)."""

from __future__ import annotations

import torch


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 5000) -> torch.optim.lr_scheduler.LambdaLR:
    """Scale the learning rate by ``min(1, (step + 1) / warmup_steps)``: torchcfm's CIFAR-10 warm-up."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(warmup_steps))


class _Warmup:
    """A picklable ``step -> factor`` (checkpoints store the scheduler)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return 1.0 if self.steps == 0 else min(1.0, (step + 1) / self.steps)
