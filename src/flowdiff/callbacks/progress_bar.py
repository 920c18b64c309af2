"""The training progress bar: Lightning's rich bar, counting the steps of ``trainer.max_steps``."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import RichProgressBar

from flowdiff.progress import LogLines


class StepProgressBar(RichProgressBar):
    """Lightning's :class:`RichProgressBar` with one training bar for the whole run, counting optimiser steps of
    ``trainer.max_steps`` (Lightning's counts the batches of an epoch of ``max_epochs``, which reads ``Epoch 4/-2``
    in a step-based run, where ``max_epochs`` is -1). Validation and long evaluations
    (:func:`flowdiff.progress.progress`) show below it. Without ``max_steps`` it is Lightning's bar.

    Where the output is not a terminal (a log file: SLURM, nohup, CI), where rich draws the bar only when it stops,
    it prints a line every ``log_every_s`` seconds instead: step, time spent and left, the training loss.

    The bar is redrawn ``refresh_rate`` times a second, not at every step: Lightning's bar updates its task and
    metrics at each step and redraws from a thread at 100 Hz, which competes with training for the interpreter
    (a sixth of a toy step's time on two CPU cores; docs/BENCHMARKS.md, "Framework overhead")."""

    def __init__(self, *args, refresh_rate: int = 10, log_every_s: float = 60.0, **kwargs) -> None:
        super().__init__(*args, refresh_rate=refresh_rate, **kwargs)
        self.log_every_s = log_every_s
        self._lines: LogLines | None = None
        self._next_draw = 0.0

    def _by_steps(self, trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _in_a_log(self) -> bool:
        return self.progress is not None and not self.progress.console.is_terminal

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.is_enabled and self._in_a_log() and self._by_steps(trainer):

            def loss() -> str:
                value = trainer.callback_metrics.get("train/loss")
                return "" if value is None else f"train/loss {float(value):.4f}"

            self._lines = LogLines("training", trainer.max_steps, self.log_every_s, "steps", loss, trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._by_steps(trainer) and not self.is_disabled and self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)  # a run that stopped early: its last step
        if self._lines is not None:
            self._lines.update(trainer.global_step)
            self._lines.close()
            self._lines = None

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps(self.trainer):
            return super()._get_train_description(current_epoch)
        return f"{f'Step (epoch {current_epoch})':{len(self.validation_description)}}"

    def _initialize_train_progress_bar_id(self) -> None:
        if not self._by_steps(self.trainer):
            return super()._initialize_train_progress_bar_id()
        description = self._get_train_description(self.trainer.current_epoch)
        self.train_progress_bar_id = self._add_task(self.trainer.max_steps, description)
        self.progress.update(self.train_progress_bar_id, completed=self.trainer.global_step)  # a resumed run

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if not self._by_steps(trainer):
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled:
            return
        if self.progress is None or self._progress_stopped:
            self._init_progress(trainer)
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        else:
            description = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=description, visible=True)
        self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._by_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        now = time.monotonic()
        if now < self._next_draw and trainer.global_step < trainer.max_steps:
            return
        self._next_draw = now + 1.0 / max(self.refresh_rate, 1)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        if self._lines is not None:
            self._lines.update(trainer.global_step)
