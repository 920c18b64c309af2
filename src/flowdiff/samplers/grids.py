"""Time grids of the fixed-step samplers, defined through the path's schedule so that they apply to every path.

The noise level of a Gaussian path is EDM's ``sigma_t = beta_t / alpha_t`` (decreasing from infinity at t = 0 to 0
at t = 1), and ``lambda_t = log(alpha_t / beta_t) = -log sigma_t`` its half log-SNR. A grid is ``steps + 1`` times
``t_0 < ... < t_steps`` inside the sampling span ``[t_lo, t_hi]`` (the objective's range, narrowed by the sampler's
``t_min``/``t_max``):

* ``uniform``: even in t (what every sampler did);
* ``edm``: Karras et al. (2022), eq. 5: even in ``sigma^(1/rho)`` from ``sigma_max`` to ``sigma_min``;
* ``logsnr``: even in ``lambda`` (DPM-Solver's choice);
* ``shift``: SD3's time shift (Esser et al. 2024), ``tau' = s tau / (1 + (s - 1) tau)`` in the time
  ``tau = sigma / (1 + sigma)`` that CondOT has at the same noise level (on CondOT exactly SD3's, ``tau = 1 - t``).

``edm`` and ``logsnr`` keep ``sigma`` within EDM's ``[sigma_min, sigma_max] = [0.002, 80]``: where the span starts
at an infinite ``sigma`` (t = 0) the grid starts at ``t(sigma_max)`` (the model then starts from the
moment-matched Gaussian of ``p_t``), and where it ends at ``sigma = 0`` (t = 1) the last step goes from
``t(sigma_min)`` to 1, as EDM's grid ends at 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

#: EDM's range of noise levels (Karras et al. 2022, Table 1)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def sigma_of(schedule, t: Tensor) -> Tensor:
    """``beta_t / alpha_t`` (``inf`` where ``alpha_t = 0``), in float64."""
    s = schedule(t.double())
    return torch.where(s.alpha > 0, s.beta / s.alpha.clamp_min(1e-300), torch.full_like(s.alpha, math.inf))


def time_of_sigma(schedule, sigma: Tensor, iterations: int = 80) -> Tensor:
    """The times ``t`` with ``beta_t / alpha_t = sigma``, by bisection (``sigma_t`` decreases in t on every path);
    ``sigma = inf`` maps to 0 and ``sigma = 0`` to 1."""
    sigma = sigma.double()
    lo, hi = torch.zeros_like(sigma), torch.ones_like(sigma)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = sigma_of(schedule, mid) > sigma  # still too noisy: the time lies later
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    t = (lo + hi) / 2
    return torch.where(torch.isinf(sigma), torch.zeros_like(t), torch.where(sigma == 0, torch.ones_like(t), t))


def _in_sigma(warp: Callable[[Tensor], Tensor], unwarp: Callable[[Tensor], Tensor]):
    """A grid even in ``warp(sigma)`` between the span's noise levels, clipped to EDM's range."""

    def grid(steps: int, t_lo: float, t_hi: float, schedule, **_) -> Tensor:
        ends = sigma_of(schedule, torch.tensor([t_lo, t_hi], dtype=torch.float64))
        s_max = min(float(ends[0]), SIGMA_MAX)
        to_data = float(ends[1]) == 0.0  # the span ends at the data: a last step from sigma_min to 0
        s_min = SIGMA_MIN if to_data else float(ends[1])
        points = steps if to_data else steps + 1
        if s_min >= s_max:
            raise ValueError(f"the sampling span [{t_lo:g}, {t_hi:g}] holds no noise levels in [{SIGMA_MIN}, {s_max}]")
        a, b = warp(torch.tensor(s_max, dtype=torch.float64)), warp(torch.tensor(s_min, dtype=torch.float64))
        frac = torch.linspace(0, 1, points, dtype=torch.float64) if points > 1 else torch.zeros(1, dtype=torch.float64)
        t = time_of_sigma(schedule, unwarp(a + frac * (b - a)))
        t[0] = max(float(t[0]), t_lo) if s_max < float(ends[0]) else t_lo
        if to_data:
            t = torch.cat([t, t.new_ones(1) * t_hi])
        else:
            t[-1] = t_hi
        return t

    return grid


def edm_grid(steps: int, t_lo: float, t_hi: float, schedule, rho: float = 7.0, **_) -> Tensor:
    """Karras et al.'s ``(sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``."""
    return _in_sigma(lambda s: s ** (1 / rho), lambda u: u**rho)(steps, t_lo, t_hi, schedule)


logsnr_grid = _in_sigma(lambda s: -torch.log(s), lambda lam: torch.exp(-lam))


def uniform_grid(steps: int, t_lo: float, t_hi: float, schedule=None, **_) -> Tensor:
    return torch.linspace(t_lo, t_hi, steps + 1, dtype=torch.float64)


def shift_grid(steps: int, t_lo: float, t_hi: float, schedule, shift: float = 3.0, **_) -> Tensor:
    """SD3's shift ``tau' = s tau / (1 + (s - 1) tau)`` of a uniform grid in ``tau = sigma / (1 + sigma)`` (CondOT's
    ``1 - t`` at the same noise level), stretched over the span's noise levels; ``shift > 1``: more steps at high
    noise, ``shift = 1``: even in that time."""
    ends = sigma_of(schedule, torch.tensor([t_lo, t_hi], dtype=torch.float64))
    tau_a, tau_b = (1.0 if math.isinf(float(v)) else float(v) / (1 + float(v)) for v in ends)
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)  # SD3's time, 1 at the noisy end of the span
    tau = tau_b + (tau_a - tau_b) * shift * u / (1 + (shift - 1) * u)
    t = time_of_sigma(schedule, torch.where(tau < 1, tau / (1 - tau).clamp_min(1e-300), torch.full_like(tau, math.inf)))
    t[0], t[-1] = t_lo, t_hi
    return t


#: ``sampler.grid`` -> ``(steps, t_lo, t_hi, schedule, rho=, shift=) -> (steps + 1,)`` float64 times
GRIDS: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform_grid,
    "edm": edm_grid,
    "logsnr": logsnr_grid,
    "shift": shift_grid,
}
