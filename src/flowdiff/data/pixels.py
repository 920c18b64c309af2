"""Pixels: the model's [-1, 1] space, [0, 1] and uint8, and the transform from a file's image to the model's."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision import transforms as T


def to_unit(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> pixel space [0, 1] (clamped)."""
    return ((x + 1) / 2).clamp(0, 1)


def to_model(x: Tensor) -> Tensor:
    """Pixel space [0, 1] -> model space [-1, 1]."""
    return x * 2 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Model space [-1, 1] -> uint8 pixels (rounded), the format FID extractors expect."""
    return (to_unit(x) * 255).round().to(torch.uint8)


def to_rgb(image):
    """A PIL image as RGB (a picklable step: DataLoader workers need one)."""
    return image.convert("RGB")


def image_transform(
    image_size: int | None,
    pad: int = 0,
    convert: Callable | None = None,
) -> T.Compose:
    """A file's PIL image -> ``(C, H, W)`` in [-1, 1]: ``convert`` (a colour conversion), a resize of the shorter
    side to ``image_size`` and a centre crop (bilinear, antialiased; ``None`` keeps the size), then ``pad`` pixels
    of black on each side. (Training flips are drawn per batch: :class:`flowdiff.data.images.TrainingOrder`.)"""
    steps: list = [] if convert is None else [convert]
    if image_size is not None:
        steps += [T.Resize(image_size, antialias=True), T.CenterCrop(image_size)]
    steps += [T.ToTensor(), T.Lambda(to_model)]
    if pad:
        steps.append(T.Pad(pad, fill=-1.0))
    return T.Compose(steps)
