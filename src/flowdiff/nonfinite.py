"""What a training run does with a NaN or Inf loss: stop, naming the step and the last checkpoint, or skip the batch."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from flowdiff.errors import NonFiniteLoss

POLICIES = ("stop", "skip", "off")
SKIP_UNDER_DDP = (
    "nan_policy=skip cannot run under DDP (one rank skipping its update would stall the others): use nan_policy=stop"
)


class NonFiniteLossGuard:
    """``policy="stop"`` stops the run with :class:`NonFiniteLoss` (the step and the last checkpoint named);
    ``"skip"`` makes no update from that batch (counted in ``skipped``; one host synchronisation per step); ``"off"``
    checks nothing. On a GPU ``stop`` keeps the first bad step on the device and looks every ``log_every_n_steps``
    steps, so that the check does not stall the launch queue (the weights may go NaN in between; the checkpoints stay
    good); ``every_step`` (default: on the CPU only) looks at every step."""

    def __init__(self, policy: str = "stop") -> None:
        if policy not in POLICIES:
            raise ValueError(f"nan_policy={policy} is unknown; choose {', '.join(POLICIES)}")
        self.policy = policy
        self.skipped = 0
        self.every_step: bool | None = None
        self._first_bad_step: Tensor | None = None

    def check_world(self, world_size: int) -> None:
        if self.policy == "skip" and world_size > 1:
            raise ValueError(SKIP_UNDER_DDP)

    def act_now(self, loss: Tensor, trainer) -> bool:
        """Whether the loss is not finite and the guard acts on it now (see the class docstring)."""
        if self.policy == "off":
            return False
        every_step = loss.device.type == "cpu" if self.every_step is None else self.every_step
        if self.policy == "skip" or every_step or trainer is None:
            return not bool(torch.isfinite(loss))
        step = torch.full((), trainer.global_step, device=loss.device, dtype=torch.long)
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, device=loss.device, dtype=torch.long)
        first = self._first_bad_step
        self._first_bad_step = torch.where((first < 0) & ~torch.isfinite(loss), step, first)
        return (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0 and int(self._first_bad_step) >= 0

    def handle(self, trainer) -> None:
        """Skip (count it; Lightning makes no update when ``training_step`` returns None) or raise."""
        step = trainer.global_step if trainer is not None else 0
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            step = int(self._first_bad_step)
        if self.policy == "skip":
            self.skipped += 1
            return
        saved = [c.last_model_path for c in getattr(trainer, "checkpoint_callbacks", []) if c.last_model_path]
        ckpt = max(saved, key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0, default="none yet")
        raise NonFiniteLoss(
            f"the training loss became NaN or Inf at step {step}; last checkpoint: {ckpt}. Lower optimizer.lr, set "
            "trainer.gradient_clip_val, or set nan_policy=skip to skip such batches"
        )
