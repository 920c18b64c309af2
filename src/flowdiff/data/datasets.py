"""Where each image dataset's files lie and how they are read: one table, :data:`DATASETS`.

An entry is bound to ``data.root`` when the datamodule is built: it checks the files there at once (missing files
and files of the wrong size, magic, shape or labels are one sentence before training, not a traceback in its
middle), and then says what the model needs to know (channels, native size, classes) and reads a split.
torchvision reads MNIST, Fashion-MNIST and CIFAR-10; an image folder is read through its scan
(:mod:`flowdiff.data.folders`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from flowdiff.data.files import check_cifar10, check_mnist
from flowdiff.data.folders import ScannedFolder, scan_image_folder
from flowdiff.data.pixels import to_rgb
from flowdiff.errors import DataError


class CIFAR10Files(datasets.CIFAR10):
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


@dataclass(frozen=True)
class TorchvisionSpec:
    """A dataset torchvision reads: its files (relative to ``root``), native shape, classes, its reader
    ``(root, train=, transform=, download=, verify_md5=)`` and the check of the folder holding the files
    (:mod:`flowdiff.data.files`)."""

    files: tuple[str, ...]
    shape: tuple[int, int, int]
    classes: int
    reader: Callable[..., Dataset]
    check: Callable[[Path], None]


class TorchvisionDataset:
    """One of torchvision's datasets under ``root``: train split trains, test split validates."""

    needs_size = False
    convert = None  # the files' images are already the dataset's channels

    def __init__(
        self, name: str, spec: TorchvisionSpec, root: Path, download: bool = False, verify_md5: bool = True, **_
    ) -> None:
        self.name, self.spec, self.root = name, spec, root
        self.download, self.verify_md5 = download, verify_md5
        present = all(p.is_file() for p in self.paths)
        if not download and not present:
            raise self.missing()  # at start-up, not deep inside the first epoch
        if present:  # a download fetches only missing files, so it would not mend a corrupt one
            spec.check(self.paths[0].parent)

    @property
    def paths(self) -> list[Path]:
        return [self.root / f for f in self.spec.files]

    channels = property(lambda self: self.spec.shape[0])
    native_size = property(lambda self: self.spec.shape[1])
    classes = property(lambda self: self.spec.classes)
    split = "train split trains, test split validates"
    split_key = "torchvision"

    def files(self) -> list[str]:
        return [str(p) for p in self.paths]

    def missing(self) -> DataError:
        return DataError(
            f"data={self.name} found no dataset under data.root={self.root}: expected "
            f"{', '.join(map(str, self.paths))}; point data.root at the folder that holds them, or set "
            "data.download=true to fetch them"
        )

    def read(self, train: bool, transform) -> Dataset:
        try:
            return self.spec.reader(
                str(self.root), train=train, transform=transform, download=self.download, verify_md5=self.verify_md5
            )
        except RuntimeError as err:
            if "not found" in str(err).lower() or "download" in str(err).lower():
                if all(p.is_file() for p in self.paths):
                    raise DataError(
                        f"data={self.name}: the files under {self.root} do not match torchvision's checksums "
                        "(corrupted or another dataset): fetch them again, or set data.verify_md5=false to read them"
                    ) from None
                raise self.missing() from None
            raise
        except (pickle.UnpicklingError, EOFError) as err:
            raise DataError(f"data={self.name}: a file under {self.root} is not a CIFAR-10 batch ({err})") from None


class ImageFolderDataset:
    """Any folder ``root/<class>/<image>``: classes become labels, ``val_fraction`` of the files (drawn with
    ``seed``) validate, images are converted to ``channels`` and resized to the configured size."""

    needs_size = True
    native_size = None

    def __init__(self, name: str, root: Path, channels: int = 3, val_fraction: float = 0.1, seed: int = 0, **_) -> None:
        self.name, self.root, self.channels = name, root, channels
        self.val_fraction, self.seed = val_fraction, seed
        if not root.is_dir():
            raise self.missing()
        self.scan = scan_image_folder(root)
        self.convert = T.Grayscale(1) if channels == 1 else to_rgb

    @property
    def classes(self) -> int:
        return len(self.scan.classes)

    @property
    def split(self) -> str:
        return f"{1 - self.val_fraction:.0%} of the files train, {self.val_fraction:.0%} validate (seed {self.seed})"

    @property
    def split_key(self) -> str:
        return f"val_fraction={self.val_fraction}|seed={self.seed}"

    def files(self) -> list[str]:
        return [path for path, _ in self.scan.samples]

    def missing(self) -> DataError:
        return DataError(
            f"data={self.name} found no dataset under data.root={self.root}: expected "
            f"{self.root}/<class name>/<image file> (one sub-folder per class); point data.root at the folder that "
            "holds them"
        )

    def read(self, train: bool, transform) -> Dataset:
        full = ScannedFolder(self.scan.samples, transform)
        order = np.random.default_rng(self.seed).permutation(len(full))
        n_val = max(1, int(round(self.val_fraction * len(full))))
        return Subset(full, order[n_val:].tolist() if train else order[:n_val].tolist())


def _mnist_files(folder: str) -> tuple[str, ...]:
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    return tuple(f"{folder}/raw/{split}-{kind}" for split in ("train", "t10k") for kind in kinds)


def _mnist(root: str, verify_md5: bool = True, **kwargs) -> Dataset:  # torchvision checks no MNIST checksum
    return datasets.MNIST(root, **kwargs)


def _fashion_mnist(root: str, verify_md5: bool = True, **kwargs) -> Dataset:
    return datasets.FashionMNIST(root, **kwargs)


def _cifar10(root: str, verify_md5: bool = True, **kwargs) -> Dataset:
    return CIFAR10Files(root, verify_md5=verify_md5, **kwargs)


CIFAR10_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]
MNIST = TorchvisionSpec(_mnist_files("MNIST"), (1, 28, 28), 10, _mnist, check_mnist)
FASHION_MNIST = TorchvisionSpec(_mnist_files("FashionMNIST"), (1, 28, 28), 10, _fashion_mnist, check_mnist)
CIFAR10 = TorchvisionSpec(
    tuple(f"cifar-10-batches-py/{f}" for f in CIFAR10_FILES), (3, 32, 32), 10, _cifar10, check_cifar10
)

#: ``data.dataset`` -> ``(name, root, download=, verify_md5=, channels=, val_fraction=, seed=)`` -> the dataset
DATASETS: dict[str, Callable[..., TorchvisionDataset | ImageFolderDataset]] = {
    "mnist": partial(TorchvisionDataset, spec=MNIST),
    "fashion_mnist": partial(TorchvisionDataset, spec=FASHION_MNIST),
    "cifar10": partial(TorchvisionDataset, spec=CIFAR10),
    "image_folder": ImageFolderDataset,
}
