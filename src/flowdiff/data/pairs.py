"""Training on stored pairs ``(x0, x1, y)`` (reflow): batches drawn from the pairs, everything else from the data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from flowdiff.data.datamodule import _FreshBatches, _ResumableLoader


class PairsDataModule(L.LightningDataModule):
    """Wraps the run's datamodule ``base``: training batches ``{"x1", "x0", "y"}`` are rows of the pairs that
    ``make_pairs()`` returns (called once, when training starts: sampling a trained model never needs them), drawn
    at random as a counter-based stream (exact resume, as for the 2D toys); validation, reference sets, shapes,
    labels and moments are ``base``'s, so metrics compare with the real data."""

    def __init__(
        self,
        base,
        make_pairs: Callable[[], dict[str, Tensor]],
        batch_size: int,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.base = base
        self._make_pairs = make_pairs
        self.pairs: dict[str, Tensor] | None = None
        self.batch_size, self.seed = batch_size, seed
        self._steps_per_epoch = steps_per_epoch
        self.rank = 0
        self.batches_drawn = 0
        self.batches_trained = 0

    def __getattr__(self, name: str) -> Any:  # the data's own properties: kind, name, data_shape, val_set, ...
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch:
            return self._steps_per_epoch
        return max(1, len(self.pairs["x1"]) // self.batch_size) if self.pairs is not None else 1

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self.base, "setup"):
            self.base.setup(stage)
        self.rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.pairs is None and stage in (None, "fit"):
            self.pairs = self._make_pairs()

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        idx = torch.randint(len(self.pairs["x1"]), (n,), generator=generator)
        return {k: v[idx] for k, v in self.pairs.items()}

    def train_dataloader(self):
        if self.pairs is None:
            self.pairs = self._make_pairs()
        return _ResumableLoader(_FreshBatches(self), batch_size=None, num_workers=0, generator=torch.Generator())

    def val_dataloader(self):
        return self.base.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.batches_trained += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_trained": self.batches_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_trained = int(state.get("batches_trained", 0))
