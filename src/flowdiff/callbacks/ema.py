"""Lightning's EMA callback with a faster update: the same averaged model, swaps and checkpoints.

``EMAWeightAveraging`` updates through ``AveragedModel.update_parameters`` with a per-tensor ``avg_fn``: three
small kernels per parameter and buffer (about 1,600 launches per step for the 35.7M-parameter CIFAR UNet) and
two reads of the ``n_averaged`` counter that wait for the GPU every step. :class:`EMA` keeps everything else
of Lightning's callback and replaces that update by one ``torch._foreach_lerp_`` over all floating-point
tensors, with no host synchronisation: ``avg <- avg + (1 - decay) (current - avg)``.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from flowdiff.errors import check_setting


class EMA(EMAWeightAveraging):
    """``EMAWeightAveraging(decay)`` with a fused, sync-free update (see the module docstring)."""

    def __init__(self, decay: float = 0.999, **kwargs) -> None:
        within = "inside (0, 1), such as 0.999 (callbacks.ema=null turns EMA off)"
        check_setting("decay", decay, lambda v: 0 < v < 1, within)
        super().__init__(decay=decay, **kwargs)
        self.decay = decay
        self._pairs: tuple[list, list, list, list] | None = None
        self._copied: bool | None = None

    def _tensors(self, pl_module) -> tuple[list, list, list, list]:
        avg = self._average_model.module
        if self._use_buffers:
            pairs = zip([*avg.parameters(), *avg.buffers()], [*pl_module.parameters(), *pl_module.buffers()])
        else:
            pairs = zip(avg.parameters(), pl_module.parameters())
        floats, others = ([], []), ([], [])
        for a, c in pairs:
            (floats if a.is_floating_point() else others)[0].append(a)
            (floats if a.is_floating_point() else others)[1].append(c)
        return floats[0], floats[1], others[0], others[1]

    @torch.no_grad()
    def _update(self, pl_module) -> None:
        if self._pairs is None:
            self._pairs = self._tensors(pl_module)
        avg_f, cur_f, avg_o, cur_o = self._pairs
        if self._copied is None:  # once per run: a resumed average already holds its history
            self._copied = bool(self._average_model.n_averaged > 0)
        if not self._copied:
            torch._foreach_copy_(avg_f, cur_f)
            self._copied = True
        else:
            torch._foreach_lerp_(avg_f, cur_f, 1.0 - self.decay)
        for a, c in zip(avg_o, cur_o):  # integer buffers (BatchNorm's counters): the current value
            a.copy_(c)
        self._average_model.n_averaged.add_(1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=step_idx):
            self._update(pl_module)
            self._latest_update_step = trainer.global_step
