"""Shared pieces of all samplers: time grids, the result type and evaluation counting.

Samplers know nothing about objectives or networks: they integrate a ``velocity_fn(x, t)``
(and, for SDEs, a ``score_fn(x, t)``), with ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)``,
from noise at ``t_min`` (about 0) to data at ``t_max`` (about 1). Where the span ends before t = 1
and a ``data_fn(x, t) = E[z | x_t]`` is given, the last step jumps to t = 1 with it (one more
evaluation): the state at ``t_max < 1`` still carries noise of size ``beta_{t_max}``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowdiff.errors import check_choice, check_setting
from flowdiff.samplers.grids import GRIDS
from flowdiff.utils import full_time

FieldFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleResult:
    """The final sample ``x`` ``(B, ...)``, the trajectory ``(T+1, B, ...)`` on ``times`` when asked, and the NFE.

    ``denoised``: the last step was the data prediction, from ``times[-2]`` to ``times[-1] = 1``.
    """

    x: Tensor
    times: Tensor
    nfe: int
    trajectory: Tensor | None = None
    denoised: bool = False

    @property
    def t_end(self) -> float:
        """Where the integration stopped (before the denoising jump, if any)."""
        return float(self.times[-2] if self.denoised else self.times[-1])


def time_grid(steps: int, t_min: float = 0.0, t_max: float = 1.0, device=None, dtype=torch.float32) -> Tensor:
    """``steps + 1`` uniform times from ``t_min`` to ``t_max``."""
    if steps < 1:
        raise ValueError(f"a sampler needs at least one step, got steps={steps}")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got [{t_min}, {t_max}]")
    return torch.linspace(t_min, t_max, steps + 1, device=device, dtype=dtype)


class CountedField:
    """Wrap a field so every call at a new point counts as one network function evaluation (NFE)."""

    def __init__(self, fn: FieldFn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


class Sampler:
    """Base class. ``steps`` is the number of time steps; ``t_min``/``t_max`` narrow the time span.

    The span actually used is the intersection of ``[t_min, t_max]`` with the ``t_span``
    passed to :meth:`sample` (the objective's safe range, see ``Objective.sample_time_range``).
    ``denoise``: end with the data prediction where the span stops before t = 1 (and ``data_fn`` is given).
    Subclasses implement :meth:`integrate` on the grid.
    """

    #: whether it draws fresh noise while sampling (SDEs, DDPM steps): the score's formula, and so such a sampler,
    #: assumes noise drawn independently of the data
    stochastic: bool = False
    #: the fields it evaluates (the sampling span is where the model's prediction converts into them)
    fields: tuple[str, ...] = ("velocity",)
    #: what it converts the fields into itself, through the path (DDIM: the data and noise of the velocity)
    conversions: tuple[str, ...] = ()
    #: whether it chooses its own steps (``steps`` then only sets the output grid)
    adaptive: bool = False
    #: network evaluations per step (what a progress bar expects; adaptive solvers cannot say)
    evaluations_per_step: int = 1

    def __init__(
        self,
        steps: int = 100,
        t_min: float = 0.0,
        t_max: float = 1.0,
        denoise: bool = True,
        grid: str = "uniform",
        rho: float = 7.0,
        shift: float = 3.0,
    ) -> None:
        check_setting("steps", steps, lambda v: v >= 1, "at least 1 (a sampler needs at least one step)", whole=True)
        check_choice("grid", grid, tuple(GRIDS))
        check_setting("rho", rho, lambda v: v > 0, "a positive number, such as EDM's 7")
        check_setting("shift", shift, lambda v: v > 0, "a positive number, such as SD3's 3 (1: the uniform grid)")
        check_setting("t_min", t_min, lambda v: 0 <= v < 1, "a time in [0, 1) (t = 0 is the noise)")
        check_setting(
            "t_max", t_max, lambda v: t_min < v <= 1, f"a time in ({t_min:g}, 1] (above t_min; 1 is the data)"
        )
        self.steps = int(steps)
        self.t_min = t_min
        self.t_max = t_max
        self.denoise = denoise
        self.grid, self.rho, self.shift = grid, rho, shift

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_") and k != "path")
        return f"{type(self).__name__}({fields})"

    @property
    def expected_nfe(self) -> int | None:
        """Network evaluations of one :meth:`sample` before a final denoising step; ``None`` if not known ahead."""
        return None if self.adaptive else self.steps * self.evaluations_per_step

    def with_steps(self, steps: int) -> Sampler:
        """This sampler with ``steps`` steps (a profile of quality against NFE; an adaptive solver answers with a
        fixed-step one)."""
        check_setting("steps", steps, lambda v: v >= 1, "at least 1 (a sampler needs at least one step)", whole=True)
        other = copy.copy(self)
        other.steps = int(steps)
        return other

    def recording(self, steps: int) -> Sampler:
        """A sampler whose trajectory holds the states at ``steps`` even intervals of its span (a teacher's
        trajectories): this one when its own grid contains them (its steps a multiple of ``steps``)."""
        if self.steps % steps:
            raise ValueError(
                f"the teacher's sampler takes {self.steps} steps, not a multiple of the student's {steps}: "
                "choose a multiple (or dopri5)"
            )
        return self

    def times(self, x0: Tensor, t_span: tuple[float, float] = (0.0, 1.0), path=None) -> Tensor:
        """The ``steps + 1`` times of the solve inside ``t_span`` and ``[t_min, t_max]``, on ``self.grid``
        (:mod:`flowdiff.samplers.grids`; all but ``uniform`` need the Gaussian ``path``'s schedule)."""
        lo, hi = max(self.t_min, t_span[0]), min(self.t_max, t_span[1])
        if self.grid == "uniform":
            return time_grid(self.steps, lo, hi, device=x0.device, dtype=x0.dtype)
        schedule = getattr(path, "schedule", None)
        if schedule is None:
            raise ValueError(
                f"sampler.grid={self.grid} is defined through a Gaussian path's noise levels: use grid=uniform"
            )
        t = GRIDS[self.grid](self.steps, lo, hi, schedule, rho=self.rho, shift=self.shift)
        return t.to(device=x0.device, dtype=x0.dtype)

    @torch.no_grad()
    def sample(
        self,
        velocity_fn: FieldFn,
        x0: Tensor,
        *,
        score_fn: FieldFn | None = None,
        data_fn: FieldFn | None = None,
        t_span: tuple[float, float] = (0.0, 1.0),
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
        path=None,
    ) -> SampleResult:
        """Integrate from ``x0`` at the span's start; ``generator`` drives the noise of SDE samplers; ``path`` (the
        model's) gives the noise levels of non-uniform grids and of the samplers that step in them."""
        for field, fn in (("score", score_fn), ("data", data_fn)):
            if field in self.fields and fn is None:
                raise ValueError(f"{type(self).__name__} needs a {field}_fn (the model gives it through the path)")
        times = self.times(x0, t_span, path)
        out = self.integrate(
            velocity_fn,
            x0,
            times,
            score_fn=score_fn,
            data_fn=data_fn,
            path=path,
            return_trajectory=return_trajectory,
            generator=generator,
        )
        if not self.denoise or data_fn is None or float(times[-1]) >= 1.0:
            return out
        # the last step: x_1 = E[z | x_{t_end}], one evaluation (DDPM's and EDM's final denoising)
        x = data_fn(out.x, full_time(times[-1], x0.shape[0], x0))
        traj = None if out.trajectory is None else torch.cat([out.trajectory, x[None]])
        times = torch.cat([times, times.new_ones(1)])
        return SampleResult(x, times, out.nfe + 1, traj, denoised=True)

    def integrate(
        self,
        velocity_fn: FieldFn,
        x0: Tensor,
        times: Tensor,
        *,
        score_fn: FieldFn | None = None,
        data_fn: FieldFn | None = None,
        path=None,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> SampleResult:  # pragma: no cover - interface
        """Integrate on the grid ``times`` ``(T+1,)``; the result's ``x`` is the state at ``times[-1]``."""
        raise NotImplementedError


class FixedStepSampler(Sampler):
    """An explicit one-step method on a fixed grid; subclasses define :meth:`step`."""

    def step(self, f: FieldFn, x: Tensor, t: float, h: float) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def integrate(
        self, velocity_fn, x0, times, *, score_fn=None, data_fn=None, path=None, return_trajectory=False, generator=None
    ):
        counted = CountedField(velocity_fn)
        batch = x0.shape[0]

        grid_times = {t: times[k].expand(batch) for k, t in enumerate(times.tolist())}  # (B,) views, no kernels

        def f(x: Tensor, t: float) -> Tensor:
            tb = grid_times.get(t)
            return counted(x, tb if tb is not None else full_time(t, batch, x))

        x, path = x0, [x0] if return_trajectory else None
        ts = times.tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            x = self.step(f, x, t, t_next - t)
            if path is not None:
                path.append(x)
        return SampleResult(x, times, counted.calls, torch.stack(path) if path is not None else None)
