"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2), on any Gaussian path through the course's time.

EDM integrates ``dx/dsigma = (x - D(x; sigma)) / sigma`` for ``x = z + sigma eps``. On the course's path
``x_t = alpha_t z + beta_t eps`` that is ``x_t / alpha_t`` at ``sigma = beta_t / alpha_t``, with the denoiser
``D(x; sigma) = E[z | x_t = alpha_t x]`` (any objective's, through the path). Each step from ``sigma_i`` to
``sigma_{i+1}`` first raises the noise to ``sigma_hat = (1 + gamma_i) sigma_i`` with fresh noise,
``gamma_i = min(S_churn / N, sqrt(2) - 1)`` for ``sigma_i`` in ``[S_tmin, S_tmax]`` (0 otherwise), then takes a
Heun step to ``sigma_{i+1}`` (an Euler step where ``sigma_{i+1} = 0``). ``S_churn = 0`` is EDM's deterministic
Heun sampler (Algorithm 1). The grid starts at ``t(sigma_max)`` at the earliest, and ``sigma_hat`` never exceeds the
grid's first noise level, so churn stays inside the objective's sampling range (EDM's own settings never churn
there: ``S_tmax = 50 < sigma_max``).
"""

from __future__ import annotations

import math

import torch

from flowdiff.errors import check_setting
from flowdiff.samplers.base import CountedField, Sampler, SampleResult
from flowdiff.samplers.grids import SIGMA_MAX, sigma_of, time_of_sigma
from flowdiff.utils import full_time


class EDMSampler(Sampler):
    """Heun with churn in EDM's noise levels; 2 evaluations of the data prediction per step (1 on a last step to
    the data)."""

    fields = ("data",)
    evaluations_per_step = 2

    @property
    def expected_nfe(self) -> int:  # the last step, to the data, takes one evaluation
        return 2 * self.steps - 1

    @property
    def stochastic(self) -> bool:  # churn adds fresh noise: it assumes noise independent of the data
        return self.s_churn > 0

    def __init__(
        self,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        steps: int = 18,
        grid: str = "edm",
        **common,  # t_min, t_max, denoise, rho, shift: the Sampler's
    ) -> None:
        super().__init__(steps, grid=grid, **common)
        check_setting("s_churn", s_churn, lambda v: v >= 0, "0 or more (0: EDM's deterministic Heun sampler)")
        check_setting("s_tmin", s_tmin, lambda v: v >= 0, "a noise level of 0 or more")
        check_setting("s_tmax", s_tmax, lambda v: v >= s_tmin, f"a noise level of at least s_tmin={s_tmin}")
        check_setting("s_noise", s_noise, lambda v: v >= 0, "0 or more, such as 1.0 or EDM's 1.003")
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def times(self, x0, t_span=(0.0, 1.0), path=None):
        """The grid on the span from ``t(sigma_max)`` on: no noise level above EDM's ``sigma_max``."""
        if path is None or not hasattr(path, "schedule"):
            raise ValueError("EDM's sampler steps in a Gaussian path's noise levels: it needs the path")
        first = float(time_of_sigma(path.schedule, torch.tensor([SIGMA_MAX])))
        return super().times(x0, (max(t_span[0], first), t_span[1]), path)

    def integrate(
        self, velocity_fn, x0, times, *, score_fn=None, data_fn=None, path=None, return_trajectory=False, generator=None
    ):
        if path is None or data_fn is None:
            raise ValueError("EDM's sampler needs the Gaussian path and the model's data prediction (data_fn)")
        data = CountedField(data_fn)
        ts = times.double()
        sigmas = sigma_of(path.schedule, ts).tolist()
        alphas = path.schedule(ts).alpha.tolist()
        n = len(sigmas) - 1
        x = x0 / alphas[0]  # EDM's x = x_t / alpha_t
        traj = [x0] if return_trajectory else None

        def denoised(x_edm, sigma: float, t: float):
            alpha = float(path.schedule(torch.tensor([t], dtype=torch.float64)).alpha)
            return data(alpha * x_edm, full_time(t, x_edm.shape[0], x_edm))

        for i in range(n):
            s_cur, s_next, t_cur, t_next = sigmas[i], sigmas[i + 1], float(ts[i]), float(ts[i + 1])
            gamma = min(self.s_churn / n, math.sqrt(2) - 1) if self.s_tmin <= s_cur <= self.s_tmax else 0.0
            s_hat = min(s_cur * (1 + gamma), sigmas[0])  # never noisier than the start: inside the sampling range
            exact = s_hat == s_cur
            t_hat = t_cur if exact else float(time_of_sigma(path.schedule, torch.tensor([s_hat], dtype=torch.float64)))
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # drawn every step, as EDM
            x_hat = x + math.sqrt(max(s_hat**2 - s_cur**2, 0.0)) * self.s_noise * eps
            d = (x_hat - denoised(x_hat, s_hat, t_hat)) / s_hat
            x = x_hat + (s_next - s_hat) * d
            if s_next > 0:
                d_prime = (x - denoised(x, s_next, t_next)) / s_next
                x = x_hat + (s_next - s_hat) * (0.5 * d + 0.5 * d_prime)
            if traj is not None:
                traj.append(x * alphas[i + 1])
        out = x * alphas[-1]
        return SampleResult(out, times, data.calls, torch.stack(traj) if traj is not None else None)
