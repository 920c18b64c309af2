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

from flowdiff.errors import ConfigError, check_setting
from flowdiff.module import FlowModule
from flowdiff.samplers import Dopri5Sampler, EulerSampler, Sampler
from flowdiff.stages.base import Stage
from flowdiff.stages.distances import check_distance, distance
from flowdiff.stages.trajectories import TeacherTrajectories
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
        y = self.labels(batch.get("c", batch.get("y")))  # a context (policies) or labels
        velocity = self.objective.to_velocity(self.path, self._forward(x, t, y), x, t)
        step = x + broadcast_time(h, x) * velocity
        return distance(step, target, self.distance).mean()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """The validation set is data, not trajectories: the student is judged by its samples (the callbacks)."""
        if "xs" not in batch:
            return None
        return super().validation_step(batch, batch_idx)


class DistillStage(TeacherTrajectories, Stage):
    """A ``steps``-step student of ``teacher``'s ODE: its Euler steps are trained to land where the teacher's ODE is at
    the same times (``stage.progressive=true`` on a ``2k``-step student: a ``k``-step one from its own steps).

    Args:
        teacher: the trained model's checkpoint.
        steps: the student's number of steps (and NFE).
        n_pairs: teacher trajectories, drawn once and stored under ``cache_dir``.
        sampler: how the teacher solves its ODE (dopri5 by default; a fixed-step one needs a multiple of ``steps``).
        progressive: the teacher's own sampler instead (a distilled student sampled in twice the steps).
        batch_size: trajectories per teacher call.
        init_from_teacher: start from the teacher's weights.
        The loss (``l2`` or ``pseudo_huber``) is :class:`DistillationModule`'s.
    """

    name = "distill"
    module_class = DistillationModule
    conditions_on_context = True  # its trajectories hold the teacher's contexts, its loss passes them
    student_guidance_scale = 1.0
    needs_teacher = True

    def __init__(
        self,
        teacher: str | None = None,
        steps: int = 1,
        n_pairs: int = 20000,
        sampler: Sampler | None = None,
        progressive: bool = False,
        batch_size: int = 5000,
        init_from_teacher: bool = True,
        cache_dir: str = "teacher_trajectories",
        **module_settings,
    ) -> None:
        check_setting("steps", steps, lambda v: v >= 1, "at least 1 (the student's number of steps)", whole=True)
        Stage.__init__(self, teacher, init_from_teacher)
        TeacherTrajectories.__init__(self, n_pairs, sampler or Dopri5Sampler(), batch_size, cache_dir)
        self.steps, self.progressive = int(steps), progressive
        self.module_settings = module_settings

    def trajectory_steps(self) -> int:
        return self.steps

    def teacher_sampler(self, teacher) -> Sampler:
        """``progressive``: the teacher's own sampler, which must take twice the student's steps."""
        if not self.progressive:
            return super().teacher_sampler(teacher)
        own = teacher.model.sampler
        if own.adaptive or own.steps != 2 * self.steps:
            raise ConfigError(
                f"stage.progressive=true halves the teacher's steps, but its sampler is {own!r}: give it a teacher "
                f"sampled in {2 * self.steps} fixed steps (a distilled student), or set stage.progressive=false"
            )
        return own

    def module_kwargs(self) -> dict:
        return dict(self.module_settings)

    def check(self, datamodule, model, coupling) -> None:
        super().check(datamodule, model, coupling)
        sampler = model.sampler
        lo, _ = model.objective.sample_time_range(model.path)
        if lo > 0 or not isinstance(sampler, EulerSampler):
            raise ConfigError(
                f"stage=distill trains Euler steps of a velocity from t = 0, which a {model.objective.prediction} "
                f"objective with {type(sampler).__name__} does not give: use objective=cfm (or data) and sampler=euler"
            )
        if sampler.steps != self.steps:  # sample.py may sample otherwise
            raise ConfigError(
                f"stage=distill trains a {self.steps}-step student but sampler.steps={sampler.steps}: drop "
                "sampler.steps (it follows stage.steps)"
            )
