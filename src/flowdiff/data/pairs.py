"""Training on stored pairs ``(x0, x1, y)`` (reflow): batches drawn from the pairs, everything else from the data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flowdiff.data.datamodule import FreshBatchStream


class PairsDataModule(FreshBatchStream):
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
        teacher=None,
    ) -> None:
        self.base = base  # first: attribute lookups fall through to it
        super().__init__(seed)
        self.teacher = teacher  # the model whose samples the pairs are (its weights start the student)
        self._make_pairs = make_pairs
        self.pairs: dict[str, Tensor] | None = None
        self.batch_size = batch_size
        self._steps_per_epoch = steps_per_epoch

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
        super().setup(stage)
        if self.pairs is None and stage in (None, "fit"):
            self.pairs = self._make_pairs()

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        idx = torch.randint(len(self.pairs["x1"]), (n,), generator=generator)
        return {k: v[idx] for k, v in self.pairs.items()}

    def train_dataloader(self):
        if self.pairs is None:
            self.pairs = self._make_pairs()
        return super().train_dataloader()

    def val_dataloader(self):
        return self.base.val_dataloader()
