"""Small tensor helpers shared by the math modules."""

from __future__ import annotations

import torch
from torch import Tensor


def broadcast_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape times ``t`` of shape ``(B,)`` to ``(B, 1, ..., 1)`` so they broadcast against ``x``.

    This is the one place where a per-sample time meets data of any shape.
    """
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def full_time(value: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A ``(B,)`` tensor of one time value, on ``like``'s device and dtype."""
    return torch.full((batch,), float(value), device=like.device, dtype=like.dtype)


def rank_share(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items split over ``world`` DDP ranks: sizes differ by at most one,
    none is empty when ``n >= world``, and the shares in rank order are ``0 .. n - 1`` (what gathering gives back)."""
    return slice(rank * n // world, (rank + 1) * n // world)


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """``generator`` itself on the CPU, else a CPU generator seeded from it (draws that must happen on the CPU)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(int(generator.initial_seed()))
