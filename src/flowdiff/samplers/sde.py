"""SDE simulation by Euler-Maruyama (course Section 2 and lab 1) and the generative SDE sampler.

For any diffusion coefficient ``sigma_t`` the SDE (course Theorem "SDE extension trick")

    dX_t = [u_t(X_t) + sigma_t^2 / 2 * score_t(X_t)] dt + sigma_t dW_t

has the same marginals ``p_t`` as the flow ODE ``dX_t = u_t(X_t) dt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from flowdiff.errors import check_choice, check_setting
from flowdiff.samplers.base import CountedField, Sampler, SampleResult
from flowdiff.utils import broadcast_time, full_time


def score_drift(velocity: Tensor | float, score: Tensor, sigma: Tensor | float) -> Tensor:
    """The drift ``u_t(x) + sigma_t^2 / 2 * score_t(x)`` of the SDE extension trick (``u = 0``: Langevin dynamics).

    ``sigma`` is a number or a ``(B,)`` tensor of per-sample ``sigma_t``.
    """
    half_var = 0.5 * (broadcast_time(sigma, score) if isinstance(sigma, Tensor) else sigma) ** 2
    return velocity + half_var * score


def simulate_sde(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Callable[[Tensor, Tensor], Tensor | float],
    x0: Tensor,
    times: Tensor,
    *,
    return_trajectory: bool = False,
    generator: torch.Generator | None = None,
) -> SampleResult:
    """Euler-Maruyama for ``dX = f(X, t) dt + g(X, t) dW`` on the grid ``times`` (``(T+1,)``).

    ``x_{k+1} = x_k + f(x_k, t_k) h + g(x_k, t_k) sqrt(h) xi``, ``xi ~ N(0, I)``; ``g`` returns a
    scalar or a ``(B,)`` tensor. NFE counts the evaluations of ``f``.
    """
    f = CountedField(drift)
    x, traj = x0, [x0] if return_trajectory else None
    ts = times.tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t
        tb = full_time(t, x.shape[0], x)
        g = diffusion(x, tb)
        if isinstance(g, Tensor):
            g = broadcast_time(g, x)
        xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + f(x, tb) * h + g * math.sqrt(h) * xi
        if traj is not None:
            traj.append(x)
    return SampleResult(x, times, f.calls, torch.stack(traj) if traj is not None else None)


class EulerMaruyamaSampler(Sampler):
    """Euler-Maruyama on the generative SDE, with optional Langevin corrector steps.

    Args:
        path: the probability path (gives ``beta_t`` for ``sigma_schedule="beta"`` and the corrector).
        sigma: the scale of ``sigma_t``.
        sigma_schedule: ``"constant"`` (``sigma_t = sigma``) or ``"beta"`` (``sigma_t = sigma beta_t``,
            vanishing at t = 1 where the score is sharpest).
        langevin_steps: corrector steps after each predictor step,
            ``x <- x + d s_t(x) + sqrt(2 d) xi`` with ``d = langevin_step * beta_t^2``.
        langevin_step: the corrector's step relative to the noise variance ``beta_t^2``.

    The velocity and score at one ``(x, t)`` count as one evaluation: the model gives both from one
    network forward (conversions are algebra on the path); each corrector step is one more.
    """

    stochastic = True
    fields = ("velocity", "score")

    def __init__(
        self,
        path,
        sigma: float = 1.0,
        sigma_schedule: Literal["constant", "beta"] = "beta",
        langevin_steps: int = 0,
        langevin_step: float = 0.01,
        steps: int = 500,
        **common,  # t_min, t_max, denoise, grid, rho, shift: the Sampler's (a key it lacks is a TypeError)
    ) -> None:
        super().__init__(steps, **common)
        check_choice("sigma_schedule", sigma_schedule, ("constant", "beta"))
        check_setting("sigma", sigma, lambda v: v >= 0, "a noise scale of 0 or more (0: the ODE)")
        check_setting("langevin_steps", langevin_steps, lambda v: v >= 0, "0 or more corrector steps", whole=True)
        check_setting("langevin_step", langevin_step, lambda v: v > 0, "a positive step, such as 0.01")
        self.path = path
        self.sigma = sigma
        self.sigma_schedule = sigma_schedule
        self.langevin_steps = int(langevin_steps)
        self.langevin_step = langevin_step

    @property
    def evaluations_per_step(self) -> int:  # the predictor and each corrector step
        return 1 + self.langevin_steps

    def sigma_t(self, t: Tensor) -> Tensor:
        """The diffusion coefficient ``sigma_t``, shape ``(B,)``."""
        if self.sigma_schedule == "constant":
            return torch.full_like(t, self.sigma)
        return self.sigma * self.path.schedule(t).beta

    def integrate(
        self, velocity_fn, x0, times, *, score_fn=None, data_fn=None, path=None, return_trajectory=False, generator=None
    ):
        corrector_evals = 0

        def drift(x: Tensor, t: Tensor) -> Tensor:
            return score_drift(velocity_fn(x, t), score_fn(x, t), self.sigma_t(t))

        def diffusion(x: Tensor, t: Tensor) -> Tensor:
            return self.sigma_t(t)

        if self.langevin_steps == 0:
            result = simulate_sde(drift, diffusion, x0, times, return_trajectory=return_trajectory, generator=generator)
            return result
        # predictor-corrector: one EM step on a two-point grid, then Langevin at the new time
        x, traj, nfe = x0, [x0] if return_trajectory else None, 0
        for k in range(self.steps):
            step = simulate_sde(drift, diffusion, x, times[k : k + 2], generator=generator)
            x, nfe = step.x, nfe + step.nfe
            tb = full_time(times[k + 1], x.shape[0], x)
            d = broadcast_time(self.langevin_step * self.path.schedule(tb).beta ** 2, x)
            for _ in range(self.langevin_steps):
                xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + d * score_fn(x, tb) + (2 * d).sqrt() * xi
                corrector_evals += 1
            if traj is not None:
                traj.append(x)
        return SampleResult(x, times, nfe + corrector_evals, torch.stack(traj) if traj is not None else None)
