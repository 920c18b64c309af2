"""Classifier-free guidance (Ho & Salimans 2022, in the course's convention).

Training drops labels to a null label with probability ``p_uncond``, so one network learns
``u_t(x | y)`` and ``u_t(x | null)``. Sampling uses

    u~_t(x | y) = (1 - w) u_t(x | null) + w u_t(x | y),

so ``w = 1`` is the plain conditional model and ``w = 0`` the unconditional one (Ho & Salimans'
guidance weight is ``w - 1``).

The condition is class labels ``(B,)`` (long) or a context ``(B, ...)`` (float: a policy's observations); a null
context is a row of NaN, which a context network replaces by its learned null context (``nets.policy``), so the
dropout and the guided combination below serve both. Every parameterisation converts to the velocity by an affine map
``pred -> A pred + B x`` (see ``GaussianPath.convert``) and ``(1 - w) + w = 1``, so mixing the raw
predictions equals mixing velocities or scores: guidance works for every objective unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowdiff.errors import check_setting

NetFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class ClassifierFreeGuidance:
    """Label dropout while training, the guided combination while sampling.

    Args:
        null_label: the index standing for "no label" (usually the number of classes).
        p_uncond: probability of replacing a label by ``null_label`` during training.
        scale: the guidance weight ``w`` used when sampling.
    """

    def __init__(self, null_label: int, p_uncond: float = 0.1, scale: float = 1.0) -> None:
        check_setting("p_uncond", p_uncond, lambda v: 0 <= v < 1, "inside [0, 1), such as 0.1")
        self.null_label = null_label
        self.p_uncond = p_uncond
        self.scale = scale

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance(null_label={self.null_label}, p_uncond={self.p_uncond}, scale={self.scale})"

    def drop_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace each condition by the null one with probability ``p_uncond``: labels ``(B,)`` by the null label,
        context rows ``(B, ...)`` by NaN rows."""
        drop = torch.rand(y.shape[:1], generator=generator, device=y.device) < self.p_uncond
        return torch.where(drop.view(-1, *[1] * (y.dim() - 1)), self.null_like(y), y)

    def null_like(self, y: Tensor) -> Tensor:
        """The null condition shaped like ``y``: the null label, or NaN rows for a context."""
        return torch.full_like(y, float("nan") if y.is_floating_point() else self.null_label)

    def guided(self, net: NetFn, x: Tensor, t: Tensor, y: Tensor, scale: float | None = None) -> Tensor:
        """``(1 - w) net(x, t, null) + w net(x, t, y)`` with one network forward.

        ``w = 1`` and ``w = 0`` need only one of the two terms; otherwise the batch is doubled.
        """
        w = self.scale if scale is None else scale
        if w == 1:
            return net(x, t, y)
        if w == 0:
            return net(x, t, self.null_like(y))
        out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.null_like(y), y]))
        uncond, cond = out.chunk(2)
        return uncond + w * (cond - uncond)
