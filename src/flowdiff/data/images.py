"""Image data: MNIST, Fashion-MNIST, CIFAR-10 and image folders through torchvision, pixels in [-1, 1].

Batches are dicts ``{"x1": (B, C, H, W) float in [-1, 1], "y": (B,) long}`` (no ``y`` when the data has
no labels), the same contract as the 2D toys, so the module, samplers, guidance and couplings need
nothing image-specific.

Splits: MNIST, Fashion-MNIST and CIFAR-10 train on their training split and validate on their test
split (``train=False`` in torchvision); an image folder holds out ``val_fraction`` of its files, drawn
with ``seed``. FID references are drawn from the training split and the FID floor compares them with
the same number of held-out images (see :meth:`ImageDataModule.real_images`).

Training order: batch ``k`` of a run is the same images (and flips) whether it is read through a DataLoader or
gathered from a copy of the training set held on the device (``on_device``): both read :class:`TrainingOrder`, a
counter-based stream, and the position in it is saved in checkpoints, so a resumed run sees the batches an
uninterrupted one would.

Nothing is downloaded unless ``download=True``: offline, missing files stop the run with one sentence
that names the files expected under ``root``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from flowdiff.data.datamodule import _ResumableLoader
from flowdiff.data.datasets import DATASETS
from flowdiff.data.pixels import image_transform, to_model, to_uint8, to_unit
from flowdiff.errors import DataError
from flowdiff.seeds import OFFSETS, seeded, stream_seed

__all__ = ["ImageDataModule", "to_model", "to_uint8", "to_unit"]


class _Collate:
    """A picklable collate (worker processes need one): ``(image, label)`` tuples -> ``{"x1", "y"}`` dicts."""

    def __init__(self, labels: bool) -> None:
        self.labels = labels

    def __call__(self, items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
        batch = {"x1": torch.stack([im for im, _ in items])}
        if self.labels:
            batch["y"] = torch.tensor([int(y) for _, y in items], dtype=torch.long)
        return batch


class TrainingOrder:
    """Which images, and which flipped, training batch ``k`` holds: position ``p`` of the run's stream is image
    ``perm_q[p - q n]`` of pass ``q = p // n`` over the ``n`` training images, each pass a permutation drawn from its
    own seed (counter-based: any batch is drawn without the ones before it); batch ``k`` of ``size`` images holds
    positions ``[k size, (k + 1) size)``. Flips are drawn per batch, from a seed of ``k``."""

    def __init__(self, n: int, seed: int, hflip: bool) -> None:
        self.n, self.seed, self.hflip = n, seed, hflip
        self._perms: dict[int, Tensor] = {}

    def _perm(self, q: int) -> Tensor:
        if q not in self._perms:
            if len(self._perms) > 4:  # a run reads passes in order: keep the last few
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(stream_seed("image order", self.seed, q))
            self._perms[q] = torch.randperm(self.n, generator=g)
        return self._perms[q]

    def indices(self, k: int, size: int) -> Tensor:
        """``(size,)`` image indices of batch ``k``."""
        p = torch.arange(k * size, (k + 1) * size)
        passes = p // self.n
        out = torch.empty(size, dtype=torch.long)
        for q in passes.unique().tolist():
            where = passes == q
            out[where] = self._perm(q)[p[where] - q * self.n]
        return out

    def flips(self, k: int, size: int) -> Tensor:
        """``(size,)`` bool: which images of batch ``k`` are mirrored (none without ``hflip``)."""
        if not self.hflip:
            return torch.zeros(size, dtype=torch.bool)
        g = torch.Generator().manual_seed(stream_seed("image flips", self.seed, k))
        return torch.rand(size, generator=g) < 0.5


class _Flippable(Dataset):
    """``dataset[(index, flip)]``: the image, mirrored left to right when ``flip``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Tensor, int]:
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label


def _first_batch(dm: ImageDataModule) -> int:
    """Where an epoch starts in the training order: the first batch not yet trained on. Inside a run Lightning asks
    for an epoch's iterator when the previous epoch is trained, however far its workers had read ahead (after a
    mid-epoch resume they read past the epoch's end); outside one, epochs follow the batches already drawn."""
    if dm.trainer is not None:
        return dm.batches_trained
    return max(dm.batches_drawn, dm.batches_trained)


class _OrderSampler(DistributedSampler):
    """The DataLoader's side of :class:`TrainingOrder`: this rank's ``(index, flip)`` pairs of the
    ``steps_per_epoch`` batches from the first one not yet trained on. Batch ``k`` of the run holds positions
    ``[k B W, (k + 1) B W)`` of the order; rank ``r`` takes every ``W``-th from the ``r``-th, as the device path
    does. A ``DistributedSampler``, so that Lightning does not wrap (and reshuffle) it under DDP."""

    def __init__(self, dm: ImageDataModule, rank: int, world: int) -> None:  # noqa: D107 (no process group needed)
        self.dm, self.rank, self.world = dm, rank, world
        self.epoch = 0

    def __len__(self) -> int:
        return self.dm.train_steps * self.dm.batch_size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        dm, size, mine = self.dm, self.dm.batch_size * self.world, slice(self.rank, None, self.world)
        start = _first_batch(dm)
        for k in range(start, start + dm.train_steps):
            dm.batches_drawn = k + 1
            yield from zip(dm.order.indices(k, size)[mine].tolist(), dm.order.flips(k, size)[mine].tolist())


class _DeviceBatches:
    """Training batches gathered from the training set held on the device as uint8: no DataLoader, no workers, no
    copies; the images and flips of :class:`TrainingOrder`, converted as the loader converts them (``/ 255``, then
    ``* 2 - 1``: the same float32 values)."""

    def __init__(self, dm: ImageDataModule, images: Tensor, labels: Tensor | None, rank: int, world: int) -> None:
        self.dm, self.images, self.labels, self.rank, self.world = dm, images, labels, rank, world

    def __len__(self) -> int:
        return self.dm.train_steps

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        dm, size, device = self.dm, self.dm.batch_size * self.world, self.images.device
        start = _first_batch(dm)
        for k in range(start, start + dm.train_steps):
            dm.batches_drawn = k + 1
            mine = slice(self.rank, None, self.world)
            idx = dm.order.indices(k, size)[mine].to(device, non_blocking=True)
            x = self.images[idx].float().div_(255).mul_(2).sub_(1)  # (B, C, H, W) in [-1, 1]
            if dm.order.hflip:
                flip = dm.order.flips(k, size)[mine].to(device, non_blocking=True)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            batch = {"x1": x}
            if self.labels is not None:
                batch["y"] = self.labels[idx]
            yield batch

    def state_dict(self) -> dict[str, Any]:  # the position lives in the datamodule's state (checkpoints)
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ImageDataModule(L.LightningDataModule):
    """One of ``mnist``, ``fashion_mnist``, ``cifar10`` or ``image_folder`` under ``root``.

    Args:
        dataset: which reader to use.
        root: torchvision's ``root`` (e.g. ``../shared/data/mnist-5k``), or the image folder itself.
        download: fetch the files if missing (needs internet; never done unless asked).
        image_size: resize to ``image_size x image_size`` (bilinear, antialiased); ``None`` keeps the
            native size (an image folder then needs it).
        pad: zero-pad (in [-1, 1] space: black) by this many pixels on each side, after resizing.
        hflip: random horizontal flips while training (CIFAR-10's usual augmentation).
        labels: give class labels (for an image folder: its sub-folder names); ``False`` for none.
        channels: 1 (grayscale) or 3 (RGB) for an image folder; fixed by the dataset otherwise.
        val_fraction: image folders only: the share of files held out for validation.
        n_val: at most this many validation images per validation round (the first of a fixed order).
        steps_per_epoch: training batches between validation rounds (drawn without replacement, passing
            over the data again as needed); ``None``: one pass over the training split.
        batch_size, num_workers, pin_memory, persistent_workers: the DataLoader's.
        on_device: keep the training set on the training device as uint8 and gather batches (and flips) there, with
            no DataLoader: ``True``, ``False``, or ``None`` (default): on a GPU when it takes at most
            ``on_device_max_mb`` (MNIST: 47 MB, CIFAR-10: 154 MB). The batches are those of the loader.
        verify_md5: check CIFAR-10's files against torchvision's checksums.
        seed: the hold-out split, the training order and the reference subsets.
    """

    kind = "image"
    gaussian_source = True
    source_name = "gaussian"

    def __init__(
        self,
        dataset: str = "mnist",
        root: str = "data",
        download: bool = False,
        image_size: int | None = None,
        pad: int = 0,
        hflip: bool = False,
        labels: bool = True,
        channels: int = 3,
        val_fraction: float = 0.1,
        n_val: int = 1000,
        steps_per_epoch: int | None = None,
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        on_device: bool | None = None,
        on_device_max_mb: float = 2048,
        verify_md5: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DataError(f"data.dataset={dataset} is unknown; choose one of {', '.join(DATASETS)}")
        if channels not in (1, 3):
            raise DataError(f"data.channels={channels} is invalid: use 1 (grayscale) or 3 (RGB)")
        if not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
        self.name = dataset
        self.root = Path(root).expanduser()
        self.image_size, self.pad = image_size, pad
        self.hflip = hflip
        self.labels = labels
        self.val_fraction, self.n_val, self.steps_per_epoch = val_fraction, n_val, steps_per_epoch
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.on_device, self.on_device_max_mb = on_device, on_device_max_mb
        self.seed = seed
        self.batches_drawn = 0  # training batches drawn so far (Lightning fetches ahead of training)
        self.batches_trained = 0  # ... and handed to a training step (what a checkpoint stores)
        self.order: TrainingOrder | None = None
        self.on_device_used: torch.device | None = None  # where the training set was put, if it was
        self.dataset = DATASETS[dataset](
            dataset,
            root=self.root,
            download=download,
            verify_md5=verify_md5,
            channels=channels,
            val_fraction=val_fraction,
            seed=seed,
        )  # the files are checked here, before training
        if self.dataset.needs_size and image_size is None:
            raise DataError(f"data={dataset} needs data.image_size: its files may differ in size")
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def data_shape(self) -> tuple[int, int, int]:
        size = self.image_size or self.dataset.native_size
        return (self.dataset.channels, size + 2 * self.pad, size + 2 * self.pad)

    @property
    def num_classes(self) -> int:
        """Classes the model is told about: 0 when ``labels=False``."""
        return self.dataset.classes if self.labels else 0

    @property
    def dataset_classes(self) -> int:
        """Classes the data has, whether or not the model sees its labels (a classifier extractor needs them)."""
        return self.dataset.classes

    @property
    def split(self) -> str:
        return self.dataset.split

    # ------------------------------------------------------------------ reading
    def _read(self, train: bool) -> Dataset:
        """The split, its images prepared as configured."""
        tf = image_transform(self.image_size, self.pad, self.dataset.convert)
        return self.dataset.read(train, tf)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = self._read(train=True)
            self._val = self._read(train=False)
            self.order = TrainingOrder(len(self._train), self.seed, self.hflip)
            rank_zero_info(
                f"data={self.name}: {len(self._train)} training and {len(self._val)} validation images of shape "
                f"{self.data_shape} ({self.split}; {min(self.n_val, len(self._val))} validate per round)"
            )

    # ------------------------------------------------------------------ loaders
    @property
    def train_steps(self) -> int:
        """Training batches per epoch: ``steps_per_epoch``, or one pass over the training split."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return max(1, len(self._train) // (self.batch_size * self._world()[1]))  # one pass over all ranks

    def _world(self) -> tuple[int, int, torch.device]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, torch.device("cpu")
        return trainer.global_rank, trainer.world_size, trainer.strategy.root_device

    def _place_on_device(self, device: torch.device) -> bool:
        if self.on_device is not None:
            return bool(self.on_device)
        mb = len(self._train) * int(np.prod(self.data_shape)) / 2**20
        return device.type == "cuda" and mb <= self.on_device_max_mb

    def _device_batches(self, rank: int, world: int, device: torch.device) -> _DeviceBatches:
        """Decode the training split once into ``(N, C, H, W)`` uint8 on ``device`` (time and size printed)."""
        start = time.perf_counter()
        loader = DataLoader(
            self._train,
            batch_size=1000,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.labels),
            generator=torch.Generator(),
        )
        images, labels = [], []
        for b in loader:
            images.append(to_uint8(b["x1"]))  # lossless: the prepared pixels are k / 255 * 2 - 1
            labels.append(b.get("y"))
        data = torch.cat(images).to(device)
        y = torch.cat(labels).to(device) if self.labels else None
        self.on_device_used = device
        rank_zero_info(
            f"data={self.name}: {len(data)} training images on {device} as uint8 ({data.numel() / 2**20:.0f} MB, "
            f"{time.perf_counter() - start:.1f} s): batches are gathered there, without a DataLoader"
        )
        return _DeviceBatches(self, data, y, rank, world)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        workers = self.num_workers
        return (DataLoader if sampler is None else _ResumableLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=_Collate(self.labels),
            generator=seeded("loader workers", self.seed),  # workers' seeds, not from the training stream
        )

    def train_dataloader(self) -> DataLoader | _DeviceBatches:
        """The training batches of :class:`TrainingOrder`: from the copy on the device (``on_device``) or through a
        DataLoader."""
        self.setup()
        rank, world, device = self._world()
        if self._place_on_device(device):
            return self._device_batches(rank, world, device)
        return self._loader(_Flippable(self._train), _OrderSampler(self, rank, world))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        n = min(self.n_val, len(self._val))
        return self._loader(Subset(self._val, range(n)))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.batches_trained += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position in the training order (the same on every rank), saved in checkpoints by Lightning."""
        return {"batches_trained": self.batches_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_trained = int(state.get("batches_trained", 0))

    def real_images(self, n: int, split: str = "train", offset: int = 0) -> tuple[Tensor, Tensor]:
        """``n`` real images ``(n, C, H, W)`` in [-1, 1] (no augmentation) and their labels, from a fixed random
        order of ``split`` (``train`` or ``val``) starting at ``offset``; fewer if the split is smaller."""
        self.setup()
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        base = self._read(train=split == "train")  # no augmentation
        order = np.random.default_rng(OFFSETS[f"real {split} images"] + self.seed).permutation(len(base))
        idx = order[offset : offset + n].tolist()
        loader = DataLoader(
            Subset(base, idx), batch_size=500, num_workers=0, collate_fn=_Collate(True), generator=torch.Generator()
        )
        xs, ys = zip(*[(b["x1"], b["y"]) for b in loader]) if idx else ((), ())
        if not xs:
            return torch.zeros(0, *self.data_shape), torch.zeros(0, dtype=torch.long)
        return torch.cat(xs), torch.cat(ys)

    def split_size(self, split: str) -> int:
        """How many images ``split`` (``train`` or ``val``) holds."""
        self.setup()
        return len(self._train if split == "train" else self._val)

    def fingerprint(self) -> str:
        """Everything that decides what :meth:`real_images` gives: the dataset, its files (path, size and mtime of
        each), the split and every preparation step (size, padding, channels). Caches of things trained on the data
        (the FID classifier) are keyed by it."""
        stats = [f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in self.dataset.files()]
        prep = (
            f"image_size={self.image_size}|pad={self.pad}|channels={self.dataset.channels}|"
            f"labels={self.dataset.classes}"
        )
        return "|".join([self.name, str(self.root.resolve()), self.dataset.split_key, prep, *stats])

    def data_moments(self, n: int = 2_000) -> tuple[Tensor, Tensor]:
        """Per-pixel mean and variance ``(C, H, W)`` of up to ``n`` training images, in the model's [-1, 1] scale."""
        x, _ = self.real_images(n, "train")
        return x.mean(0), x.var(0)

    def __len__(self) -> int:
        self.setup()
        return len(self._train)
