"""Consistency models (Song et al. 2023): a function ``f(x_t, t)`` that maps every point of an ODE trajectory to the
trajectory's end at t = 1, so one evaluation at t = 0 turns noise into a sample.

**Parameterisation.** ``f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(x, t)`` is the data prediction ``E[z | x_t]``
of the network's objective on the path (:meth:`GaussianPath.conversion_coefficients`): for a velocity network on
CondOT ``f = x + (1 - t) v``. Because ``alpha_1 = 1`` and ``beta_1 = 0`` the coefficients at t = 1 are exactly
``(1, 0)``: the boundary condition ``f(x, 1) = x`` holds by construction, and a flow model is a consistency model's
natural start (its ``f`` at t = 0 is one Euler step to t = 1).

**Loss.** On the grid ``t_n = n / N``, with ``s = t_n < t = t_{n+1}`` and ``x_s`` drawn from the path::

    L = E d( f_theta(x_s, s),  f_theta^-(x_t, t) ),     theta^- <- mu theta^- + (1 - mu) theta  (no gradient)

* distillation (a teacher): ``x_t`` is one teacher ODE step (Heun or Euler) from ``(x_s, s)``; N and mu fixed, the
  grid uniform in the course's t;
* training (no teacher): ``x_s, x_t`` share the data ``z`` and noise ``eps``; a curriculum says how the grid grows
  during training, how an interval is drawn and weighted, and mu: :class:`SongCurriculum` (Song et al. 2023: a grid
  uniform in t, ``N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` points, ``mu(k) = exp(s0 log mu0 /
  N(k))``) or :class:`ImprovedCurriculum` (improved consistency training, Song & Dhariwal 2023, on EDM's sigma grid
  mapped to t through the path).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from flowdiff.errors import ConfigError
from flowdiff.module import FlowModule
from flowdiff.rules import chosen
from flowdiff.stages.base import Stage
from flowdiff.stages.distances import check_distance, distance
from flowdiff.utils import broadcast_time, cpu_generator


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


def uniform_times(points: int, lo: float, hi: float) -> Tensor:
    """``points`` times evenly spaced from ``lo`` to ``hi`` (float64)."""
    return lo + (hi - lo) * torch.linspace(0, 1, points, dtype=torch.float64)


def uniform_intervals(times: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` indices of intervals ``[times[i], times[i + 1]]`` drawn uniformly, ``(n,)`` long, on the CPU."""
    return torch.randint(len(times) - 1, (n,), generator=cpu_generator(generator))


class SongCurriculum:
    """Consistency training's schedule of Song et al. 2023 (appendix C): ``N(k)`` points (:func:`training_points`)
    uniform in the course's t, an interval drawn uniformly, no loss weight, the target's EMA rate
    ``mu(k) = exp(s0 log mu0 / N(k))`` (``mu0 = 0``: the online network without gradient, as improved CT does)."""

    def __init__(self, s0: int = 2, s1: int = 150, mu0: float = 0.0) -> None:
        if not 2 <= s0 <= s1 or not 0 <= mu0 < 1:
            raise ValueError(f"consistency settings out of range: 2 <= s0={s0} <= s1={s1}, mu0={mu0} in [0, 1)")
        self.s0, self.s1, self.mu0 = int(s0), int(s1), float(mu0)

    def __repr__(self) -> str:
        return f"SongCurriculum(s0={self.s0}, s1={self.s1}, mu0={self.mu0})"

    def points(self, step: int, total: int) -> int:
        return training_points(step, total, self.s0, self.s1)

    def target_decay(self, points: int) -> float:
        return math.exp(self.s0 * math.log(self.mu0) / points) if self.mu0 > 0 else 0.0

    def times(self, points: int, path, lo: float, hi: float) -> Tensor:
        """The grid ``(points,)``, increasing in t (float64)."""
        return uniform_times(points, lo, hi)

    def draw(self, times: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` interval indices ``i`` (intervals ``[times[i], times[i + 1]]``), ``(n,)`` long, on the CPU."""
        return uniform_intervals(times, n, generator)

    def weights(self, path, times: Tensor) -> Tensor | None:
        """The loss weight of each interval, ``(points - 1,)``, or ``None`` for none."""
        return None


class ImprovedCurriculum(SongCurriculum):
    """Improved consistency training's choices (Song & Dhariwal 2023, sections 3.3-3.5), mapped to the course's time
    through the path's ``beta_t / alpha_t``, EDM's sigma (:meth:`GaussianPath.time_at_noise_to_signal`):

    * ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` points, ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` (doubling);
    * Karras et al.'s grid ``sigma_i = (sigma_min^(1/rho) + (i - 1) / (N - 1) (sigma_max^(1/rho) -
      sigma_min^(1/rho)))^rho``, at ``t_i = t(sigma_i)``;
    * interval ``[sigma_i, sigma_{i+1}]`` drawn with probability proportional to
      ``erf((log sigma_{i+1} - P_mean) / (sqrt(2) P_std)) - erf((log sigma_i - P_mean) / (sqrt(2) P_std))`` (lognormal);
    * loss weight ``1 / (sigma_{i+1} - sigma_i)``; the target is the online network without gradient (mu = 0).

    The sigmas are EDM's, for data of standard deviation 0.5 (images in [-1, 1]); ``sigma_data`` scales them (and
    the lognormal) to data of another scale, the same problem in other units.
    """

    def __init__(
        self,
        s0: int = 10,
        s1: int = 1280,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__(s0, s1, 0.0)
        if not 0 < sigma_min < sigma_max or rho <= 0 or p_std <= 0 or sigma_data <= 0:
            raise ValueError(
                f"consistency settings out of range: 0 < sigma_min={sigma_min} < sigma_max={sigma_max}, "
                f"rho={rho} > 0, p_std={p_std} > 0, sigma_data={sigma_data} > 0"
            )
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    def __repr__(self) -> str:
        return (
            f"ImprovedCurriculum(s0={self.s0}, s1={self.s1}, sigma in [{self.sigma_min}, {self.sigma_max}], "
            f"rho={self.rho}, P_mean={self.p_mean}, P_std={self.p_std}, sigma_data={self.sigma_data})"
        )

    def points(self, step: int, total: int) -> int:
        stage = max(int(total / (math.log2(self.s1 // self.s0) + 1)), 1)  # K' = floor(K / (log2 floor(s1/s0) + 1))
        return min(self.s0 * 2 ** (step // stage), self.s1) + 1

    def _sigmas(self, points: int) -> Tensor:  # (points,) in EDM's units, decreasing: sigma_max first
        ramp = torch.linspace(1, 0, points, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + ramp * (hi - lo)) ** self.rho

    def sigmas(self, points: int) -> Tensor:
        """The grid's sigmas on this data's scale, ``(points,)``, decreasing."""
        return self._sigmas(points) * (self.sigma_data / 0.5)

    def times(self, points: int, path, lo: float, hi: float) -> Tensor:
        return path.time_at_noise_to_signal(self.sigmas(points)).clamp(lo, hi)

    def draw(self, times: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        log_sigma = self._sigmas(len(times)).log()
        cdf = torch.erf((log_sigma - self.p_mean) / (math.sqrt(2) * self.p_std))
        probabilities = cdf[:-1] - cdf[1:]  # interval i: from sigma_i (noisier) to sigma_{i+1}
        return torch.multinomial(probabilities, n, replacement=True, generator=cpu_generator(generator))

    def weights(self, path, times: Tensor) -> Tensor:
        sigmas = self.sigmas(len(times))
        return 1 / (sigmas[:-1] - sigmas[1:])


class ConsistencyModule(FlowModule):
    """A :class:`FlowModule` whose network is trained as a consistency function (see the module docstring) and
    sampled with :class:`flowdiff.samplers.ConsistencySampler` (``f`` is :meth:`VectorFields.data`).

    Args (besides :class:`FlowModule`'s):
        teacher: a trained :class:`~flowdiff.model.FlowModel` (consistency distillation), or ``None`` (training).
        intervals: ``N`` for distillation.
        target_decay: ``mu`` for distillation (0: the target is the online network without gradient).
        curriculum: consistency training's schedule (:class:`SongCurriculum` by default).
        loss: ``pseudo_huber`` or ``l2``.
        teacher_solver: ``heun`` or ``euler``, the teacher's step between adjacent times.
    """

    def __init__(
        self,
        *args,
        teacher=None,
        intervals: int = 18,
        target_decay: float = 0.95,
        curriculum: SongCurriculum | None = None,
        loss: str = "pseudo_huber",
        teacher_solver: str = "heun",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        problem = consistency_problem(self.path, self.objective)
        if problem is not None:
            raise ValueError(f"stage=consistency cannot train a {self.objective.prediction} network: {problem}")
        if teacher_solver not in ("heun", "euler"):
            raise ValueError(f"stage.teacher_solver must be heun or euler, got {teacher_solver!r}")
        if intervals < 1 or not 0 <= target_decay < 1:
            raise ValueError(
                f"consistency settings out of range: intervals={intervals} (>= 1), target_decay={target_decay} "
                "(in [0, 1))"
            )
        self.distance = check_distance(loss)
        self.intervals, self.target_decay = int(intervals), float(target_decay)
        self.curriculum = curriculum if curriculum is not None else SongCurriculum()
        self._grids: dict[int, Tensor] = {}
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
        points = self.curriculum.points(step, total)
        return max(points - 1, 1), self.curriculum.target_decay(points)

    def grid(self, intervals: int) -> tuple[Tensor, Tensor | None]:
        """The times ``(intervals + 1,)`` increasing in t, and each interval's loss weight (or ``None``): uniform in
        t for distillation, the curriculum's for training; computed once per size."""
        if intervals not in self._grids:
            lo, hi = self.train_t_range
            if self.teacher is not None:
                times, weights = uniform_times(intervals + 1, lo, hi), None
            else:
                times = self.curriculum.times(intervals + 1, self.path, lo, hi)
                weights = self.curriculum.weights(self.path, times)
            self._grids[intervals] = (times, weights)
        return self._grids[intervals]

    def draw_intervals(self, times: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` interval indices: uniform for distillation, the curriculum's choice for training."""
        if self.teacher is not None:
            return uniform_intervals(times, n, generator)
        return self.curriculum.draw(times, n, generator)

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
        if "c" in batch and batch.get("y") is not None:
            raise ValueError("a batch holds both a context c and labels y: put the labels (a task) into the context")
        z, y = batch["x1"], batch.get("c", batch.get("y"))  # the condition: a context (policies) or labels
        eps = self.noise_like(z, generator)
        y = self.training_labels(y, generator)
        n_intervals, _ = self.schedule()
        times, weights = self.grid(n_intervals)
        i = self.draw_intervals(times, z.shape[0], generator)
        s, t = times[i].to(z), times[i + 1].to(z)
        if self.channels_last:
            z, eps = z.contiguous(memory_format=torch.channels_last), eps.contiguous(memory_format=torch.channels_last)
        x_s = self.path.sample(z, eps, s).x_t
        with torch.no_grad():
            x_t = self._teacher_step(x_s, s, t, y) if self.teacher is not None else self.path.sample(z, eps, t).x_t
            target = self.consistency_function(self.target_net, x_t, t, y)
        d = distance(self.consistency_function(self._forward, x_s, s, y), target, self.distance)
        return d.mean() if weights is None else (weights[i].to(d) * d).mean()

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """``theta^- <- mu theta^- + (1 - mu) theta`` after each optimiser step."""
        _, mu = self.schedule()
        target, online = list(self.target_net.parameters()), list(self.net.parameters())
        if mu == 0:
            torch._foreach_copy_(target, online)
        else:
            torch._foreach_lerp_(target, online, 1.0 - mu)


class ConsistencyStage(Stage):
    """A consistency model: distilled from ``teacher``'s ODE (one teacher step between adjacent times), or trained
    from data when there is no teacher. Its settings (intervals, target_decay, curriculum, loss, teacher_solver) are
    :class:`ConsistencyModule`'s; ``init_from_teacher`` starts both the online and the target network from the
    teacher's weights."""

    name = "consistency"
    module_class = ConsistencyModule
    student_guidance_scale = 1.0
    conditions_on_context = True  # ConsistencyModule.loss passes the batch's context to both networks and the teacher

    def __init__(self, teacher: str | None = None, init_from_teacher: bool = True, **module_settings) -> None:
        super().__init__(teacher, init_from_teacher)
        self.module_settings = module_settings

    def module_kwargs(self) -> dict:
        teacher = self.teacher
        return {**self.module_settings, "teacher": None if teacher is None else teacher.model}

    def check(self, datamodule, model, coupling) -> None:
        super().check(datamodule, model, coupling)
        problem = consistency_problem(model.path, model.objective)
        if problem is not None:
            fix = "use path=condot or path=cosine" if model.objective.prediction == "velocity" else "use objective=cfm"
            objective = chosen("objective", f"a {model.objective.prediction} objective")
            raise ConfigError(
                f"stage=consistency cannot use {objective} with the {type(model.path.schedule).__name__}: {problem}; "
                f"{fix}"
            )
        teacher = self.teacher
        if teacher is not None:
            lo, _ = teacher.model.objective.sample_time_range(teacher.model.path)
            if lo > 0:
                raise ConfigError(
                    f"stage=consistency: the teacher's velocity is not finite at t = 0 (its objective "
                    f"{teacher.model.objective.prediction} is sampled from t = {lo:.3g}), where distillation "
                    "starts: use a cfm or data teacher, or teacher=null for consistency training"
                )

    def initialise(self, module) -> None:
        super().initialise(module)
        if self.teacher is not None and self.init_from_teacher:
            module.target_net.load_state_dict(module.net.state_dict())
