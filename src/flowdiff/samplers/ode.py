"""ODE samplers for ``dX_t = u_t(X_t) dt`` (course Section 2): fixed-step Euler, midpoint, Heun, RK4,
and adaptive Dormand-Prince (dopri5) through torchdiffeq."""

from __future__ import annotations

import copy

from torchdiffeq import odeint

from flowdiff.errors import check_setting
from flowdiff.samplers.base import CountedField, FieldFn, FixedStepSampler, Sampler, SampleResult


class EulerSampler(FixedStepSampler):
    """``x_{t+h} = x_t + h u_t(x_t)``: first order, 1 NFE per step."""

    def step(self, f: FieldFn, x, t, h):
        return x + h * f(x, t)


class MidpointSampler(FixedStepSampler):
    """Explicit midpoint: ``x_{t+h} = x_t + h u_{t+h/2}(x_t + h/2 u_t(x_t))``: second order, 2 NFE per step."""

    evaluations_per_step = 2

    def step(self, f: FieldFn, x, t, h):
        return x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * h)


class HeunSampler(FixedStepSampler):
    """Heun (explicit trapezoid): second order, 2 NFE per step."""

    evaluations_per_step = 2

    def step(self, f: FieldFn, x, t, h):
        k1 = f(x, t)
        k2 = f(x + h * k1, t + h)
        return x + 0.5 * h * (k1 + k2)


class RK4Sampler(FixedStepSampler):
    """Classical fourth-order Runge-Kutta, 4 NFE per step."""

    evaluations_per_step = 4

    def step(self, f: FieldFn, x, t, h):
        k1 = f(x, t)
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, t + h)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


class Dopri5Sampler(Sampler):
    """Adaptive Dormand-Prince 5(4) by ``torchdiffeq.odeint``; ``steps`` only sets the trajectory's output times."""

    adaptive = True

    def __init__(
        self,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        steps: int = 100,
        t_min: float = 0.0,
        t_max: float = 1.0,
        denoise: bool = True,
    ):
        super().__init__(steps, t_min, t_max, denoise)
        check_setting("rtol", rtol, lambda v: v > 0, "a positive relative tolerance, such as 1e-5")
        check_setting("atol", atol, lambda v: v > 0, "a positive absolute tolerance, such as 1e-5")
        self.rtol = rtol
        self.atol = atol

    def with_steps(self, steps: int) -> Sampler:
        """Euler's ``steps`` steps: an adaptive solver's steps are not its own to set."""
        check_setting("steps", steps, lambda v: v >= 1, "at least 1 (a sampler needs at least one step)", whole=True)
        return EulerSampler(int(steps), self.t_min, self.t_max, self.denoise)

    def recording(self, steps: int) -> Dopri5Sampler:
        """The same solve, its output grid ``steps`` even intervals (free for an adaptive solver)."""
        other = copy.copy(self)
        other.steps = steps
        return other

    def integrate(
        self, velocity_fn, x0, times, *, score_fn=None, data_fn=None, path=None, return_trajectory=False, generator=None
    ):
        counted = CountedField(velocity_fn)

        def f(t, x):  # torchdiffeq's argument order, scalar t
            return counted(x, t.expand(x.shape[0]).to(x.dtype))

        out_times = times if return_trajectory else times[[0, -1]]
        # step_t: no step may overshoot t_max, where the field may be undefined (sqrt and VP schedules at t > 1)
        traj = odeint(f, x0, out_times, rtol=self.rtol, atol=self.atol, method="dopri5", options={"step_t": times[-1:]})
        return SampleResult(traj[-1], times, counted.calls, traj if return_trajectory else None)
