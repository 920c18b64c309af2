"""Dataset files checked before training, each mismatch one sentence naming the file, what was expected and what was
found: MNIST's and Fashion-MNIST's idx files (magic numbers, dimensions, sizes, label range, image and label counts)
and CIFAR-10's pickled batches (a readable pickle, the ``data`` array's shape and dtype, labels in range).

torchvision reads these formats without checking them: a truncated idx file passed start-up and stopped training
with ``RuntimeError: shape '[4000, 28, 28]' is invalid for input of size 984``. Image folders are checked image by
image when they are scanned (:func:`flowdiff.data.folders.scan_image_folder`: unreadable files are left out, with a
warning naming them).
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

from flowdiff.errors import DataError

FIX = "copy it again, or delete it and set data.download=true where there is internet (only missing files are fetched)"
IDX_MAGIC = {"images": 2051, "labels": 2049}  # idx3 (unsigned bytes, 3 dimensions), idx1


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path} {what}: {FIX}")


def _read_header(path: Path, ints: int) -> tuple[int, ...]:
    size = path.stat().st_size
    if size == 0:
        raise _bad(path, "is empty (0 bytes)")
    if size < 4 * ints:
        raise _bad(path, f"holds {size} bytes, fewer than its {4 * ints}-byte idx header")
    with open(path, "rb") as fh:
        return struct.unpack(f">{ints}I", fh.read(4 * ints))


def check_idx(path: Path, kind: str, shape: tuple[int, int] = (28, 28), classes: int = 10) -> int:
    """The number of items in the idx file ``path`` of ``kind`` ``images`` (``(n, *shape)`` uint8) or ``labels``
    (``n`` values below ``classes``); :class:`DataError` for anything else."""
    ints = 4 if kind == "images" else 2
    magic, n, *dims = _read_header(path, ints)
    if magic != IDX_MAGIC[kind]:
        raise _bad(path, f"starts with magic number {magic}, not {IDX_MAGIC[kind]} (an idx file of {kind})")
    if n == 0:
        raise _bad(path, f"holds no {kind} (its header says 0)")
    if kind == "images" and tuple(dims) != shape:
        raise _bad(path, f"holds images of {dims[0]} x {dims[1]} pixels, not {shape[0]} x {shape[1]}")
    expected = 4 * ints + n * int(np.prod(shape) if kind == "images" else 1)
    size = path.stat().st_size
    if size != expected:
        cut = "truncated" if size < expected else "longer than its header says"
        raise _bad(path, f"holds {size} bytes, but its header promises {n} {kind}, {expected} bytes ({cut})")
    if kind == "labels":
        labels = np.fromfile(path, dtype=np.uint8, offset=8)
        if labels.size and int(labels.max()) >= classes:
            at = int(labels.argmax())
            raise _bad(path, f"holds label {int(labels[at])} (item {at}), outside 0..{classes - 1}")
    return n


def check_mnist(raw: Path, classes: int = 10) -> None:
    """The four idx files under ``raw`` (``<split>-images-idx3-ubyte``, ``<split>-labels-idx1-ubyte``)."""
    for split in ("train", "t10k"):
        images = check_idx(raw / f"{split}-images-idx3-ubyte", "images")
        labels = check_idx(raw / f"{split}-labels-idx1-ubyte", "labels", classes=classes)
        if images != labels:
            raise _bad(raw / f"{split}-labels-idx1-ubyte", f"holds {labels} labels for {images} images")


def check_cifar_batch(path: Path, classes: int = 10) -> int:
    """The number of images in the pickled CIFAR-10 batch ``path``: a dict with ``data`` ``(n, 3072)`` uint8 and
    ``labels`` (``n`` values in ``0 .. classes - 1``)."""
    if path.stat().st_size == 0:
        raise _bad(path, "is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise _bad(path, f"is not a readable pickle ({type(err).__name__}: {err}; truncated?)") from None
    if not isinstance(batch, dict) or "data" not in batch or not ({"labels", "fine_labels"} & set(batch)):
        found = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise _bad(path, f"is not a CIFAR-10 batch (a dict with data and labels; found {found})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch.get("labels", batch.get("fine_labels")))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise _bad(path, f"holds data of shape {data.shape} and dtype {data.dtype}, not (n, 3072) uint8")
    if labels.shape != (len(data),):
        raise _bad(path, f"holds {labels.size} labels for {len(data)} images")
    if not np.issubdtype(labels.dtype, np.integer):
        raise _bad(path, f"holds labels of type {labels.dtype}, not class indices")
    if labels.size and not (0 <= labels.min() and labels.max() < classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise _bad(path, f"holds label {int(bad)}, outside 0..{classes - 1}")
    return len(data)


def check_cifar10(folder: Path) -> None:
    """The five training batches, the test batch and ``batches.meta`` under ``folder`` (``cifar-10-batches-py``)."""
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        check_cifar_batch(folder / name)
    meta = folder / "batches.meta"
    try:
        with open(meta, "rb") as fh:
            names = pickle.load(fh, encoding="latin1").get("label_names")
    except Exception as err:
        raise _bad(meta, f"is not a readable CIFAR-10 meta file ({type(err).__name__}: {err})") from None
    if not isinstance(names, list) or len(names) != 10:
        raise _bad(meta, f"holds label_names {names!r}, not the 10 class names")
