"""Class labels: what a model is conditioned on when it samples, in one place.

Every sampling draw of a class-conditional (CFG) model takes its labels from :func:`sampling_labels` (the FID
samples, the teacher's trajectories, ``sample.py``), a grid from :func:`grid_rows`, and a single model call from
:func:`as_labels`. An unconditional model gets ``None`` from each.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sampling_labels(
    n: int, num_classes: int, label: int | None = None, reference: Tensor | None = None
) -> Tensor | None:
    """``(n,)`` labels for ``n`` samples of a model with ``num_classes`` classes (0: unconditional, ``None``).

    ``label`` gives every sample that class; else the ``reference`` labels (a held-out set's, so the samples share
    its class frequencies), repeated to ``n``; else the balanced cycle ``0, 1, ..., C-1, 0, 1, ...``."""
    if num_classes == 0:
        return None
    if label is not None:
        return torch.full((n,), int(label), dtype=torch.long)
    if reference is not None:
        return reference[:n].repeat(n // max(len(reference), 1) + 1)[:n]
    return torch.arange(n) % num_classes


def grid_rows(num_classes: int, per_class: int) -> Tensor | None:
    """Labels of a grid with one row of ``per_class`` images per class (``None`` for an unconditional model)."""
    if num_classes == 0:
        return None
    return torch.arange(num_classes).repeat_interleave(per_class)


def as_labels(n: int, y: Tensor | int | None, device: torch.device | str | None = None) -> Tensor | None:
    """``y`` as ``(n,)`` labels on ``device``: an int or a 0-d tensor for all ``n``, or ``(n,)`` labels as given."""
    if y is None:
        return None
    y = torch.as_tensor(y, dtype=torch.long) if isinstance(y, int) else y
    if y.dim() == 0:
        y = y.expand(n)
    return y if device is None else y.to(device)
