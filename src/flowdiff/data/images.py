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
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader

from flowdiff.data.files import check_cifar10, check_mnist
from flowdiff.errors import DataError
from flowdiff.seeds import OFFSETS, seeded


def to_unit(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> pixel space [0, 1] (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


def to_model(x: Tensor) -> Tensor:
    """Pixel space [0, 1] -> model space [-1, 1]."""
    return x * 2 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> uint8 pixels (rounded), the format FID extractors expect."""
    return (to_unit(x) * 255).round().to(torch.uint8)


class _CIFAR10Files(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader; ``verify_md5=False`` accepts files of the right format but other content
    (the tests' tiny pickled batches). The format and the file names are torchvision's."""

    def __init__(self, *args, verify_md5: bool = True, **kwargs) -> None:
        self._verify_md5 = verify_md5
        super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        if self._verify_md5:
            return super()._load_meta()
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as fh:
            self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


#: the files torchvision reads for each dataset, relative to ``root`` (named in the offline error)
EXPECTED_FILES: dict[str, list[str]] = {
    "mnist": [
        "MNIST/raw/train-images-idx3-ubyte",
        "MNIST/raw/train-labels-idx1-ubyte",
        "MNIST/raw/t10k-images-idx3-ubyte",
        "MNIST/raw/t10k-labels-idx1-ubyte",
    ],
    "fashion_mnist": [
        "FashionMNIST/raw/train-images-idx3-ubyte",
        "FashionMNIST/raw/train-labels-idx1-ubyte",
        "FashionMNIST/raw/t10k-images-idx3-ubyte",
        "FashionMNIST/raw/t10k-labels-idx1-ubyte",
    ],
    "cifar10": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    + ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
    "image_folder": ["<class name>/<image file> (one sub-folder per class)"],
}

#: channels and native size of each dataset (an image folder is read as configured)
NATIVE_SHAPE: dict[str, tuple[int, int, int]] = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}
#: each dataset's file check (:mod:`flowdiff.data.files`), given the folder that holds its files
CHECKS = {"mnist": check_mnist, "fashion_mnist": check_mnist, "cifar10": check_cifar10}


@dataclass
class FolderScan:
    """What :func:`scan_image_folder` found: the classes with images, ``(path, class index)`` per readable image,
    and what it left out, by reason."""

    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: dict[str, list[str]]


def scan_image_folder(root: Path) -> FolderScan:
    """Every file under ``root/<class>/``, decoded once: non-image files, unreadable or truncated images and empty
    class folders are left out with one warning that counts them (a bad file would otherwise stop training at
    the batch that draws it); a folder with no readable image is one sentence (:class:`DataError`)."""
    start = time.perf_counter()
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(
            f"data=image_folder found no class sub-folders under {root}: put images in "
            f"{root}/<class name>/ (one folder with everything is one class)"
        )
    skipped: dict[str, list[str]] = {"not image files": [], "unreadable or truncated images": [], "empty classes": []}
    per_class: list[tuple[str, list[str]]] = []
    for folder in folders:
        good = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if not path.name.lower().endswith(IMG_EXTENSIONS):
                skipped["not image files"].append(str(path))
                continue
            try:
                with Image.open(path) as image:
                    image.load()  # decodes all of it: a truncated file fails here, not in the middle of training
                good.append(str(path))
            except Exception:
                skipped["unreadable or truncated images"].append(str(path))
        if good:
            per_class.append((folder.name, good))
        else:
            skipped["empty classes"].append(folder.name)
    if not per_class:
        raise DataError(
            f"data=image_folder found no readable image under {root}/<class name>/ (extensions: "
            f"{', '.join(IMG_EXTENSIONS)}): check data.root"
        )
    classes = [name for name, _ in per_class]
    samples = [(path, i) for i, (_, paths) in enumerate(per_class) for path in paths]
    left_out = [f"{len(v)} {k} (e.g. {v[0]})" for k, v in skipped.items() if v]
    if left_out:
        rank_zero_warn(f"data=image_folder under {root}: left out " + "; ".join(left_out))
    rank_zero_info(
        f"data=image_folder: {len(samples)} images in {len(classes)} classes under {root} "
        f"(checked in {time.perf_counter() - start:.1f} s)"
    )
    return FolderScan(classes, samples, skipped)


class _ScannedFolder(Dataset):
    """The readable images of a :class:`FolderScan`, as ``(transformed image, class index)``."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(pil_loader(path)), label


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
        if dataset not in EXPECTED_FILES:
            raise DataError(f"data.dataset={dataset} is unknown; choose one of {', '.join(EXPECTED_FILES)}")
        if channels not in (1, 3):
            raise DataError(f"data.channels={channels} is invalid: use 1 (grayscale) or 3 (RGB)")
        if not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction={val_fraction} must lie in (0, 1)")
        self.name = dataset
        self.root = Path(root).expanduser()
        self.download = download
        self.image_size, self.pad, self.hflip = image_size, pad, hflip
        self.labels = labels
        self.val_fraction, self.n_val, self.steps_per_epoch = val_fraction, n_val, steps_per_epoch
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.verify_md5 = verify_md5
        self.seed = seed
        if dataset == "image_folder":
            if image_size is None:
                raise DataError("data=image_folder needs data.image_size: its files may differ in size")
            self._channels = channels
            self._classes = self._folder_classes()
        else:
            self._channels = NATIVE_SHAPE[dataset][0]
            self._classes = NUM_CLASSES[dataset]
            present = all((self.root / f).is_file() for f in EXPECTED_FILES[dataset])
            if not download and not present:
                raise self._missing()  # at start-up, not deep inside the first epoch
            if present:  # files of the wrong size, magic, shape or labels: one sentence now, not mid-training (a
                # download fetches only missing files, so it would not mend them)
                CHECKS[dataset](self.root / Path(EXPECTED_FILES[dataset][0]).parent)
        self._train: Dataset | None = None
        self._val: Dataset | None = None

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def data_shape(self) -> tuple[int, int, int]:
        size = self.image_size or NATIVE_SHAPE[self.name][1]
        return (self._channels, size + 2 * self.pad, size + 2 * self.pad)

    @property
    def num_classes(self) -> int:
        """Classes the model is told about: 0 when ``labels=False``."""
        return self._classes if self.labels else 0

    @property
    def dataset_classes(self) -> int:
        """Classes the data has, whether or not the model sees its labels (a classifier extractor needs them)."""
        return self._classes

    @property
    def split(self) -> str:
        if self.name == "image_folder":
            return (
                f"{1 - self.val_fraction:.0%} of the files train, {self.val_fraction:.0%} validate (seed {self.seed})"
            )
        return "train split trains, test split validates"

    # ------------------------------------------------------------------ reading
    def _transform(self, train: bool) -> T.Compose:
        steps: list[Any] = []
        if self.name == "image_folder":
            steps += [T.Grayscale(1) if self._channels == 1 else T.Lambda(_rgb)]
        if self.image_size is not None:
            steps += [T.Resize(self.image_size, antialias=True), T.CenterCrop(self.image_size)]
        if train and self.hflip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Lambda(to_model)]
        if self.pad:
            steps.append(T.Pad(self.pad, fill=-1.0))
        return T.Compose(steps)

    def _missing(self) -> DataError:
        files = ", ".join(str(self.root / f) for f in EXPECTED_FILES[self.name])
        return DataError(
            f"data={self.name} found no dataset under data.root={self.root}: expected {files}; "
            "point data.root at the folder that holds them, or set data.download=true to fetch them"
        )

    def _read(self, train: bool) -> Dataset:
        tf = self._transform(train)
        try:
            if self.name == "mnist":
                return datasets.MNIST(str(self.root), train=train, transform=tf, download=self.download)
            if self.name == "fashion_mnist":
                return datasets.FashionMNIST(str(self.root), train=train, transform=tf, download=self.download)
            if self.name == "cifar10":
                return _CIFAR10Files(
                    str(self.root), train=train, transform=tf, download=self.download, verify_md5=self.verify_md5
                )
        except RuntimeError as err:
            if "not found" in str(err).lower() or "download" in str(err).lower():
                if all((self.root / f).is_file() for f in EXPECTED_FILES[self.name]):
                    raise DataError(
                        f"data={self.name}: the files under {self.root} do not match torchvision's checksums "
                        "(corrupted or another dataset): fetch them again, or set data.verify_md5=false to read them"
                    ) from None
                raise self._missing() from None
            raise
        except (pickle.UnpicklingError, EOFError) as err:
            raise DataError(f"data={self.name}: a file under {self.root} is not a CIFAR-10 batch ({err})") from None
        return self._folder(train, tf)

    def _folder_classes(self) -> int:
        if not self.root.is_dir():
            raise self._missing()
        self._scan = scan_image_folder(self.root)
        return len(self._scan.classes)

    def _folder(self, train: bool, tf) -> Dataset:
        full = _ScannedFolder(self._scan.samples, tf)
        order = np.random.default_rng(self.seed).permutation(len(full))
        n_val = max(1, int(round(self.val_fraction * len(full))))
        return Subset(full, order[n_val:].tolist() if train else order[:n_val].tolist())

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = self._read(train=True)
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
        base = self._read(train=False) if split == "val" else self._unaugmented_train()
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
        if self.name == "image_folder":
            files = [path for path, _ in self._scan.samples]
            split = f"val_fraction={self.val_fraction}|seed={self.seed}"
        else:
            files = [str(self.root / f) for f in EXPECTED_FILES[self.name]]
            split = "torchvision"
        stats = [f"{f}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files]
        prep = f"image_size={self.image_size}|pad={self.pad}|channels={self._channels}|labels={self._classes}"
        return "|".join([self.name, str(self.root.resolve()), split, prep, *stats])

    def data_moments(self, n: int = 2_000) -> tuple[Tensor, Tensor]:
        """Per-pixel mean and variance ``(C, H, W)`` of up to ``n`` training images, in the model's [-1, 1] scale."""
        x, _ = self.real_images(n, "train")
        return x.mean(0), x.var(0)

    def _unaugmented_train(self) -> Dataset:
        flip, self.hflip = self.hflip, False
        try:
            return self._read(train=True)
        finally:
            self.hflip = flip

    def __len__(self) -> int:
        self.setup()
        return len(self._train)


def _rgb(image):
    return image.convert("RGB")
