"""DDIM on any Gaussian path (Song et al. 2021, written in the course's alpha/beta notation).

From the prediction at ``(x_t, t)`` the path recovers ``z_hat`` and ``eps_hat`` and the step to ``t' > t`` is

    x_{t'} = alpha_{t'} z_hat + sqrt(beta_{t'}^2 - s^2) eps_hat + s xi,
    s = eta * (beta_{t'} / beta_t) * sqrt(beta_t^2 - (alpha_t / alpha_{t'})^2 beta_{t'}^2),

``s`` being the DDPM posterior standard deviation scaled by ``eta`` (``eta = 0``: deterministic
DDIM, which on the CondOT path is exactly Euler; ``eta = 1``: ancestral DDPM sampling).
"""

from __future__ import annotations

import torch

from flowdiff.errors import check_setting
from flowdiff.samplers.base import CountedField, Sampler, SampleResult
from flowdiff.utils import broadcast_time, full_time


class DDIMSampler(Sampler):
    """DDIM (``eta = 0``) to DDPM (``eta = 1``) steps built from any objective's prediction, via the path."""

    conversions = ("data", "noise")  # of the velocity, through the path: a Gaussian path

    @property
    def stochastic(self) -> bool:  # eta > 0 draws fresh noise at every step: it needs noise independent of the data
        return self.eta > 0

    def __init__(
        self,
        path,
        eta: float = 0.0,
        steps: int = 100,
        **common,  # t_min, t_max, denoise, grid, rho, shift: the Sampler's (a key it lacks is a TypeError)
    ) -> None:
        super().__init__(steps, **common)
        # beyond 1 the variance beta'^2 - s^2 of the eps_hat term would be negative
        check_setting("eta", eta, lambda v: 0 <= v <= 1, "a number with 0 <= eta <= 1 (0: DDIM, 1: DDPM's ancestral)")
        self.path = path
        self.eta = eta

    def times(self, x0, t_span=(0.0, 1.0), path=None):
        # its own conversions velocity -> (data, noise) must be finite too (e.g. alpha^2 schedules at t = 0)
        lo, hi = self.path.time_range([("velocity", "data"), ("velocity", "noise")])
        return super().times(x0, (max(t_span[0], lo), min(t_span[1], hi)), path or self.path)

    def integrate(
        self, velocity_fn, x0, times, *, score_fn=None, data_fn=None, path=None, return_trajectory=False, generator=None
    ):
        counted = CountedField(velocity_fn)
        x, traj = x0, [x0] if return_trajectory else None
        ts = times.tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            tb, tb_next = full_time(t, x.shape[0], x), full_time(t_next, x.shape[0], x)
            u = counted(x, tb)
            z_hat = self.path.convert(u, "velocity", "data", x, tb)
            eps_hat = self.path.convert(u, "velocity", "noise", x, tb)
            now, nxt = self.path.schedule(tb), self.path.schedule(tb_next)
            alpha, beta = broadcast_time(now.alpha, x), broadcast_time(now.beta, x)
            alpha2, beta2 = broadcast_time(nxt.alpha, x), broadcast_time(nxt.beta, x)
            x = alpha2 * z_hat
            if self.eta > 0:
                c2 = (beta**2 - (alpha / alpha2) ** 2 * beta2**2).clamp_min(0)
                s = self.eta * beta2 / beta * c2.sqrt()
                xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + (beta2**2 - s**2).clamp_min(0).sqrt() * eps_hat + s * xi
            else:
                x = x + beta2 * eps_hat
            if traj is not None:
                traj.append(x)
        return SampleResult(x, times, counted.calls, torch.stack(traj) if traj is not None else None)
