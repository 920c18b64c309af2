"""Image data: MNIST, Fashion-MNIST, CIFAR-10 and image folders through torchvision, pixels in [-1, 1].

Batches are dicts ``{"x1": (B, C, H, W) float in [-1, 1], "y": (B,) long}`` (no ``y`` when the data has
no labels), the same contract as the 2D toys, so the module, samplers, guidance and couplings need
nothing image-specific.

Splits: MNIST, Fashion-MNIST and CIFAR-10 train on their training split and validate on their test
split (``train=False`` in torchvision); an image folder holds out ``val_fraction`` of its files, drawn
with ``seed``. FID references are drawn from the training split and the FID floor compares them with
the same number of held-out images (see :meth:`ImageDataModule.real_images`).

Nothing is downloaded unless ``download=True``: offline, missing files stop the run with one sentence
that names the files expected under ``root``.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision import transforms as T

from flowdiff.data.datasets import DATASETS
from flowdiff.data.pixels import image_transform, to_model, to_uint8, to_unit
from flowdiff.errors import DataError
from flowdiff.seeds import OFFSETS, seeded

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
        verify_md5: check CIFAR-10's files against torchvision's checksums.
        seed: the hold-out split and the reference subsets.
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
        self.augmentation = [T.RandomHorizontalFlip()] if hflip else []  # training only
        self.labels = labels
        self.val_fraction, self.n_val, self.steps_per_epoch = val_fraction, n_val, steps_per_epoch
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.seed = seed
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
    def _read(self, train: bool, augmentation=()) -> Dataset:
        """The split, its images prepared as configured, with ``augmentation`` (training batches only)."""
        tf = image_transform(self.image_size, self.pad, self.dataset.convert, augmentation)
        return self.dataset.read(train, tf)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = self._read(train=True, augmentation=self.augmentation)
            self._val = self._read(train=False)
            rank_zero_info(
                f"data={self.name}: {len(self._train)} training and {len(self._val)} validation images of shape "
                f"{self.data_shape} ({self.split}; {min(self.n_val, len(self._val))} validate per round)"
            )

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        workers = self.num_workers
        sampler = None
        if shuffle:
            g = torch.Generator().manual_seed(self.seed)
            n = None if self.steps_per_epoch is None else self.steps_per_epoch * self.batch_size
            sampler = RandomSampler(dataset, num_samples=n, generator=g)
            drop_last = drop_last and len(sampler) >= self.batch_size  # a tiny dataset still gives a batch
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and workers > 0,
            collate_fn=_Collate(self.labels),
            generator=seeded("loader workers", self.seed),  # workers' seeds, not from the training stream
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self._train, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        n = min(self.n_val, len(self._val))
        return self._loader(Subset(self._val, range(n)), shuffle=False, drop_last=False)

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
