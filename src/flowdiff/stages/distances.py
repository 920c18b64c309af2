"""How far a student's output is from its target, per sample: what distillation and consistency losses average."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DISTANCES = ("l2", "pseudo_huber")


def check_distance(name: str) -> str:
    if name not in DISTANCES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(DISTANCES)}")
    return name


def distance(a: Tensor, b: Tensor, name: str = "l2") -> Tensor:
    """``(B,)``: ``l2`` is the mean squared difference per coordinate; ``pseudo_huber`` is
    ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` for ``d`` coordinates (Song & Dhariwal 2023,
    improved consistency training: robust to outliers like LPIPS, without a feature network's bias)."""
    diff = (a - b).flatten(1)
    if name == "l2":
        return diff.pow(2).mean(1)
    if name == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1])
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(DISTANCES)}")
