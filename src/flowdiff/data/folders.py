"""Image folders (``root/<class>/<image>``): the scan that decodes every file once, and the dataset it finds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader

from flowdiff.errors import DataError


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


class ScannedFolder(Dataset):
    """The readable images of a :class:`FolderScan`, as ``(transformed image, class index)``."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        return self.transform(pil_loader(path)), label
