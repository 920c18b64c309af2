"""Writers of torchvision's on-disk formats: MNIST's idx files, CIFAR-10's pickled batches, image folders.

Used to make small datasets of the right format where the real ones cannot be fetched (tests, benchmarks on
machines without internet) and to export subsets.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def write_mnist(root: str | Path, images: np.ndarray, labels: np.ndarray, train: bool, folder: str = "MNIST") -> None:
    """``images`` ``(N, 28, 28)`` uint8 and ``labels`` ``(N,)`` as ``root/<folder>/raw/*-idx?-ubyte``."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if train else "t10k"
    images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.uint8)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_cifar10(root: str | Path, images: np.ndarray, labels: np.ndarray, batches: int = 5) -> None:
    """``images`` ``(N, 32, 32, 3)`` uint8 as ``root/cifar-10-batches-py``: ``batches`` training batches and a
    test batch, each holding all ``N`` images (enough for format and throughput tests)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(images, np.uint8).transpose(0, 3, 1, 2).reshape(len(images), -1)
    entry = {"data": data, "labels": [int(v) for v in labels]}
    for name in [f"data_batch_{i}" for i in range(1, batches + 1)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({**entry, "batch_label": name}, fh)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": len(images), "num_vis": data.shape[1]}, fh)


def write_image_folder(root: str | Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """``images`` ``(N, H, W, 3)`` uint8 as PNG files ``root/<class>/<k>.png``."""
    for k, (image, label) in enumerate(zip(np.asarray(images, np.uint8), labels)):
        folder = Path(root) / classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{k:05d}.png")
