"""Lightning DataModule for the 2D toys: fresh points every training step, fixed seeded val/test sets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from flowdiff.data.toys import Toy, build_toy
from flowdiff.seeds import seeded, stream_seed


def batch_seed(seed: int, rank: int, index: int) -> int:
    """The seed of training batch ``index`` on DDP rank ``rank``: a counter-based stream, so any batch can be drawn
    again without replaying the ones before it (what an exact resume needs)."""
    return stream_seed(seed, rank, index)


class _FreshBatches(IterableDataset):
    """``steps_per_epoch`` batches per epoch, each drawn in one vectorised call (no per-point Python loop).

    Batch ``k`` of the run is drawn from ``batch_seed(seed, rank, k)``; an epoch starts at the first batch not yet
    trained on (``FreshBatchStream.batches_trained``, restored from a checkpoint), so a resumed run sees exactly the
    batches an uninterrupted one would, although Lightning fetches one batch ahead."""

    def __init__(self, dm: FreshBatchStream) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        dm = self.dm
        start = max(dm.batches_drawn, dm.batches_trained)
        for k in range(start, start + dm.steps_per_epoch):
            dm.batches_drawn = k + 1
            yield dm.draw(dm.batch_size, torch.Generator().manual_seed(batch_seed(dm.seed, dm.rank, k)))


class _ResumableLoader(DataLoader):
    """Tells Lightning that the stream resumes exactly (no warning on a mid-epoch resume): its position lives in
    ``FreshBatchStream.state_dict``, which counts trained batches where a loader's own state would count fetched
    ones."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FreshBatchStream(L.LightningDataModule):
    """A datamodule whose training batches are drawn, not read: ``draw(batch_size, generator)`` (a subclass's) on
    the counter-based stream of :class:`_FreshBatches`, ``steps_per_epoch`` per epoch. Its position (batches trained
    on, the same on every DDP rank) is what checkpoints store, so resumes are exact."""

    batch_size: int
    steps_per_epoch: int

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.rank = 0
        self.batches_drawn = 0  # training batches drawn so far (Lightning draws one ahead of training)
        self.batches_trained = 0  # ... and handed to a training step (what a checkpoint stores)

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        # under DDP every rank draws its own training batches (the fixed validation sets stay shared)
        self.rank = self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        # every loader has its own generator: a DataLoader draws a base seed each time it is iterated, which would
        # otherwise come from (and shift) the global stream that training noise is drawn from
        return _ResumableLoader(_FreshBatches(self), batch_size=None, num_workers=0, generator=torch.Generator())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.batches_trained += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the training stream (the same on every rank), saved in checkpoints by Lightning."""
        return {"batches_trained": self.batches_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_trained = int(state.get("batches_trained", 0))


class ToyDataModule(FreshBatchStream):
    """Target ``name`` (a key of ``TOYS``), optional non-Gaussian ``source`` for data-to-data flows.

    Batches are dicts: ``x1`` (data, ``(B, 2)``), ``y`` (labels ``(B,)``) and, for a non-Gaussian
    source, ``x0`` (``(B, 2)``); a Gaussian source is drawn by the model.
    """

    kind = "vector"

    def __init__(
        self,
        name: str = "moons",
        params: dict | None = None,
        source: str = "gaussian",
        source_params: dict | None = None,
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        n_val: int = 2000,
        n_test: int = 2000,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.name = name
        self.target: Toy = build_toy(name, **(params or {}))
        self.source_name = source
        self.source: Toy | None = None if source == "gaussian" else build_toy(source, **(source_params or {}))
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.n_val, self.n_test = n_val, n_test
        self.val_set = self.draw(n_val, seeded("val set", seed))
        self.test_set = self.draw(n_test, seeded("test set", seed))

    @property
    def dim(self) -> int:
        return self.target.dim

    @property
    def data_shape(self) -> tuple[int]:
        return (self.target.dim,)

    @property
    def num_classes(self) -> int:
        return self.target.num_classes

    @property
    def gaussian_source(self) -> bool:
        return self.source is None

    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x1, y = self.target.sample(n, generator)
        batch = {"x1": x1, "y": y}
        if self.source is not None:
            batch["x0"] = self.source.points(n, generator)
        return batch

    def data_moments(self, n: int = 10_000) -> tuple[Tensor, Tensor]:
        """Per-coordinate mean and variance of the data, from ``n`` fixed draws."""
        x = self.target.sample(n, seeded("data moments", self.seed))[0]
        return x.mean(0), x.var(0)

    def _fixed(self, data: dict[str, Tensor]) -> DataLoader:
        n = len(data["x1"])
        batches = [
            {k: v[i : i + self.batch_size * 4] for k, v in data.items()} for i in range(0, n, self.batch_size * 4)
        ]
        return DataLoader(batches, batch_size=None, num_workers=0, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        return self._fixed(self.val_set)
