"""Consistency models (Song et al. 2023): a function ``f(x_t, t)`` that maps every point of an ODE trajectory to the
trajectory's end at t = 1, so one evaluation at t = 0 turns noise into a sample.

**Parameterisation.** ``f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(x, t)`` is the data prediction ``E[z | x_t]``
of the network's objective on the path (:meth:`GaussianPath.conversion_coefficients`): for a velocity network on
CondOT ``f = x + (1 - t) v``. Because ``alpha_1 = 1`` and ``beta_1 = 0`` the coefficients at t = 1 are exactly
``(1, 0)``: the boundary condition ``f(x, 1) = x`` holds by construction, and a flow model is a consistency model's
natural start (its ``f`` at t = 0 is one Euler step to t = 1).

**Loss.** On the grid ``t_n = n / N``, with ``s = t_n < t = t_{n+1}`` and ``x_s`` drawn from the path::

    L = E d( f_theta(x_s, s),  f_theta^-(x_t, t) ),     theta^- <- mu theta^- + (1 - mu) theta  (no gradient)

* distillation (a teacher): ``x_t`` is one teacher ODE step (Heun or Euler) from ``(x_s, s)``; N and mu fixed;
* training (no teacher): ``x_s, x_t`` share the data ``z`` and noise ``eps``; the number of grid points grows
  during training, ``N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` (``N - 1`` intervals) and
  ``mu(k) = exp(s0 log mu0 / N(k))``.

The grid is uniform in the path's time (the course's t), not EDM's sigma grid.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from flowdiff.module import FlowModule
from flowdiff.stages.distances import check_distance, distance
from flowdiff.utils import broadcast_time


def consistency_problem(path, objective) -> str | None:
    """Why ``objective`` on ``path`` cannot be a consistency function, or ``None`` when it can: its data prediction
    must be finite on all of [0, 1] and reduce to ``x`` at t = 1 (true for a velocity network on a Gaussian path)."""
    if "data" not in getattr(path, "parameterisations", ()):
        return "it needs a Gaussian path (a data prediction), so a Gaussian source with path.sigma=0"
    if objective.prediction == "data":
        return "a data network's prediction at t = 1 is not x itself, so the boundary condition would not hold"
    lo, hi = path.time_range([(objective.prediction, "data")], margins=objective.sample_margins)
    if lo > 0 or hi < 1:
        return (
            f"the {objective.prediction} prediction's conversion to data is not finite on all of [0, 1] "
            f"(only on [{lo:.3g}, {hi:.3g}]), where one-step sampling starts at t = 0"
        )
    return None


def training_points(step: int, total: int, s0: int, s1: int) -> int:
    """``N(k)``, the grid points of consistency training at step ``k`` of ``K``: ``s0`` at the start, ``s1 + 1`` at
    the end (Song et al. 2023, appendix C)."""
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    return math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


class ConsistencyModule(FlowModule):
    """A :class:`FlowModule` whose network is trained as a consistency function (see the module docstring) and
    sampled with :class:`flowdiff.samplers.ConsistencySampler` (``f`` is :meth:`VectorFields.data`).

    Args (besides :class:`FlowModule`'s):
        teacher: a trained :class:`FlowModule` (consistency distillation), or ``None`` (consistency training).
        intervals: ``N`` for distillation.
        target_decay: ``mu`` for distillation (0: the target is the online network without gradient).
        s0, s1, mu0: the schedule of ``N`` and ``mu`` for training (``s0 >= 2``: at least one interval); ``mu0 = 0``
            makes the target the online network without gradient, as improved consistency training does.
        loss: ``pseudo_huber`` or ``l2``.
        teacher_solver: ``heun`` or ``euler``, the teacher's step between adjacent times.
    """

    def __init__(
        self,
        *args,
        teacher: FlowModule | None = None,
        intervals: int = 18,
        target_decay: float = 0.95,
        s0: int = 2,
        s1: int = 150,
        mu0: float = 0.0,
        loss: str = "pseudo_huber",
        teacher_solver: str = "heun",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        problem = consistency_problem(self.path, self.objective)
        if problem is not None:
            raise ValueError(f"stage=consistency cannot train a {self.objective.prediction} network: {problem}")
        if teacher_solver not in ("heun", "euler"):
            raise ValueError(f"consistency.teacher_solver must be heun or euler, got {teacher_solver!r}")
        if intervals < 1 or not 0 <= target_decay < 1 or not 2 <= s0 <= s1 or not 0 <= mu0 < 1:
            raise ValueError(
                f"consistency settings out of range: intervals={intervals} (>= 1), target_decay={target_decay} and "
                f"mu0={mu0} (in [0, 1)), 2 <= s0={s0} <= s1={s1}"
            )
        self.distance = check_distance(loss)
        self.intervals, self.target_decay = int(intervals), float(target_decay)
        self.s0, self.s1, self.mu0 = int(s0), int(s1), float(mu0)
        self.teacher_solver = teacher_solver
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)  # f^-, kept in checkpoints
        self.__dict__["teacher"] = teacher  # not a submodule: the student's checkpoint holds no teacher weights
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["teacher"] = None  # copies (EMA's) average the student's weights: they need no copy of the teacher
        return state

    # ------------------------------------------------------------------ the consistency function
    def consistency_function(self, net, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``f(x, t) = c_skip(t) x + c_out(t) net(x, t, y)``: the objective's data prediction on the path."""
        return self.objective.to_data(self.path, net(x, t, y), x, t)

    def schedule(self, step: int | None = None) -> tuple[int, float]:
        """``(intervals, mu)`` at training step ``step`` (fixed for distillation)."""
        if self.teacher is not None:
            return self.intervals, self.target_decay
        trainer = self._trainer
        total = trainer.max_steps if trainer is not None and trainer.max_steps > 0 else 1
        step = (trainer.global_step if trainer is not None else 0) if step is None else step
        points = training_points(step, total, self.s0, self.s1)
        return max(points - 1, 1), math.exp(self.s0 * math.log(self.mu0) / points) if self.mu0 > 0 else 0.0

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    def _teacher_step(self, x: Tensor, s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """One step of the teacher's ODE from ``(x, s)`` to ``t``."""
        velocity = self.teacher.vector_fields(y).velocity
        h = broadcast_time(t - s, x)
        d1 = velocity(x, s)
        if self.teacher_solver == "euler":
            return x + h * d1
        return x + 0.5 * h * (d1 + velocity(x + h * d1, t))

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        z, y = batch["x1"], batch.get("y")
        eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        if self.guidance is not None and y is not None:
            y = self.guidance.drop_labels(y, generator) if self.training else y
        else:
            y = None
        n_intervals, _ = self.schedule()
        lo, hi = self.train_t_range
        n = torch.randint(n_intervals, (z.shape[0],), device=z.device, generator=generator).to(z.dtype)
        s = lo + (hi - lo) * n / n_intervals
        t = lo + (hi - lo) * (n + 1) / n_intervals
        if self.channels_last:
            z, eps = z.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        x_s = self.path.sample(z, eps, s).x_t
        with torch.no_grad():
            x_t = self._teacher_step(x_s, s, t, y) if self.teacher is not None else self.path.sample(z, eps, t).x_t
            target = self.consistency_function(self.target_net, x_t, t, y)
        return distance(self.consistency_function(self._forward, x_s, s, y), target, self.distance).mean()

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """``theta^- <- mu theta^- + (1 - mu) theta`` after each optimiser step."""
        _, mu = self.schedule()
        target, online = list(self.target_net.parameters()), list(self.net.parameters())
        if mu == 0:
            torch._foreach_copy_(target, online)
        else:
            torch._foreach_lerp_(target, online, 1.0 - mu)
