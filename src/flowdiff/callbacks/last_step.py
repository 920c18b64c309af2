"""Validation of the last training step, whatever the epoch length."""

from __future__ import annotations

import lightning as L


class ValidateLastStep(L.Callback):
    """Ends training through ``trainer.should_stop`` at ``max_steps``: Lightning then validates that very step (as
    for early stopping), so metrics, plots, grids and ``last.ckpt`` describe the final weights even when
    ``max_steps`` is not a multiple of the epoch length."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
