"""Training throughput: images (or points) per second over the steady part of a run."""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    """Times training steps ``skip`` to the last (the first ones pay for compilation and warm-up);
    :meth:`result` gives ``perf/samples_per_s`` (all ranks) and ``perf/ms_per_step``, which ``train.py`` adds
    to the run's metrics. Validation time is excluded; the GPU is synchronised only at the ends of each
    timed stretch."""

    def __init__(self, skip: int = 50) -> None:
        self.skip = skip
        self.seconds = 0.0
        self.steps = 0
        self.samples = 0
        self._start: float | None = None

    def _sync(self, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _stop(self, pl_module) -> None:
        if self._start is not None:
            self._sync(pl_module)
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.skip and self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is not None:
            self.steps += 1
            self.samples += len(batch["x1"])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop(pl_module)
        self.world = trainer.world_size

    def result(self) -> dict[str, float]:
        if not self.steps or self.seconds <= 0:
            return {}
        return {
            "perf/samples_per_s": getattr(self, "world", 1) * self.samples / self.seconds,
            "perf/ms_per_step": 1000 * self.seconds / self.steps,
            "perf/timed_steps": self.steps,
        }
