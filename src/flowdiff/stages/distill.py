"""Distillation: a ``k``-step student of a teacher's ODE (Liu et al. 2023 and InstaFlow for ``k = 1``; Salimans &
Ho 2022's progressive halving when the teacher is itself a ``2k``-step student sampled with its own steps).

Each batch holds the teacher's states ``x_{t_0} = x0, ..., x_{t_k}`` along its ODE
(:mod:`flowdiff.stages.trajectories`). One Euler step of the student from ``x_{t_i}`` must land on the teacher's
``x_{t_{i+1}}``::

    L = E_{x0, i} d( x_{t_i} + (t_{i+1} - t_i) v_theta(x_{t_i}, t_i),  x_{t_{i+1}} )

so the student's ``k``-step Euler sampler maps each noise to the teacher's sample of it. ``v_theta`` is the
objective's velocity (:meth:`Objective.to_velocity`), so a ``cfm`` or ``data`` student works alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.module import FlowModule
from flowdiff.stages.distances import check_distance, distance
from flowdiff.utils import broadcast_time


class DistillationModule(FlowModule):
    """A :class:`FlowModule` trained on a teacher's trajectories (batches ``{"xs": (B, k + 1, ...), "times":
    (B, k + 1), "y"}``) with the distance ``loss`` (``l2`` or ``pseudo_huber``); it samples as any flow does."""

    def __init__(self, *args, loss: str = "l2", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.distance = check_distance(loss)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        xs, times = batch["xs"], batch["times"]  # (B, k + 1, ...), (B, k + 1)
        n, k = xs.shape[0], xs.shape[1] - 1
        rows = torch.arange(n, device=xs.device)
        i = torch.randint(k, (n,), device=xs.device, generator=generator)  # which student step
        x, target = xs[rows, i], xs[rows, i + 1]
        t, h = times[rows, i], times[rows, i + 1] - times[rows, i]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = batch.get("y") if self.guidance is not None else None
        velocity = self.objective.to_velocity(self.path, self._forward(x, t, y), x, t)
        step = x + broadcast_time(h, x) * velocity
        return distance(step, target, self.distance).mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """The validation set is data, not trajectories: the student is judged by its samples (the callbacks)."""
        if "xs" not in batch:
            return None
        return super().validation_step(batch, batch_idx)
