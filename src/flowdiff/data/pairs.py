"""Training on a teacher's stored trajectories (reflow, distillation): batches drawn from them, everything else from
the data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flowdiff.data.datamodule import FreshBatchStream


class PairsDataModule(FreshBatchStream):
    """Wraps the run's datamodule ``base``: training batches are rows of the trajectories ``{"xs": (n, k + 1, ...),
    "times": (k + 1,), "y"}`` that ``make_trajectories()`` returns (called once, when training starts: sampling a
    trained model never needs them), drawn at random as a counter-based stream (exact resume, as for the 2D toys),
    as ``{"x0": noise, "x1": the teacher's sample, "xs", "times": (B, k + 1), "y"}``. Validation, reference sets,
    shapes, labels and moments are ``base``'s, so metrics compare with the real data."""

    def __init__(
        self,
        base,
        make_trajectories: Callable[[], dict[str, Tensor]],
        batch_size: int,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        self.base = base  # first: attribute lookups fall through to it
        super().__init__(seed)
        self._make_pairs = make_trajectories
        self.pairs: dict[str, Tensor] | None = None
        self.batch_size = batch_size
        self._steps_per_epoch = steps_per_epoch

    def __getattr__(self, name: str) -> Any:  # the data's own properties: kind, name, data_shape, val_set, ...
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:  # the data's training set, for images (dunder lookups skip __getattr__)
        return len(self.base)

    def __bool__(self) -> bool:  # a datamodule is there, whether or not its data has a length
        return True

    @property
    def name(self) -> str:  # LightningDataModule has a class attribute of this name: __getattr__ never sees it
        return self.base.name

    @property
    def steps_per_epoch(self) -> int:
        if self._steps_per_epoch:
            return self._steps_per_epoch
        return max(1, len(self.pairs["xs"]) // self.batch_size) if self.pairs is not None else 1

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self.base, "setup"):
            self.base.setup(stage)
        super().setup(stage)
        if self.pairs is None and stage in (None, "fit"):
            self.pairs = self._make_pairs()

    def state_dict(self) -> dict:
        """The stream position and the data's own state (a policy's normalisation: the student rolls out with it)."""
        base = self.base.state_dict() if hasattr(self.base, "state_dict") else {}
        return {**super().state_dict(), "base": base}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("base") and hasattr(self.base, "load_state_dict"):
            self.base.load_state_dict(state["base"])

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        idx = torch.randint(len(self.pairs["xs"]), (n,), generator=generator)
        xs = self.pairs["xs"][idx]
        times = self.pairs["times"].expand(n, -1)
        condition = "c" if "c" in self.pairs else "y"  # a policy teacher's contexts, or labels
        return {"x0": xs[:, 0], "x1": xs[:, -1], "xs": xs, "times": times, condition: self.pairs[condition][idx]}

    def train_dataloader(self):
        if self.pairs is None:
            self.pairs = self._make_pairs()
        return super().train_dataloader()

    def val_dataloader(self):
        return self.base.val_dataloader()
