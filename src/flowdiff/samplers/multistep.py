"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"),
multistep, in data-prediction form, on any Gaussian path and so for any objective.

With ``lambda_t = log(alpha_t / beta_t)`` the probability-flow ODE has the exact solution

    x_t = (beta_t / beta_s) x_s + beta_t int_{lambda_s}^{lambda_t} e^lambda  x_hat(x_lambda, lambda) d lambda,

``x_hat = E[z | x_t]`` (the path converts any prediction into it). Taking ``x_hat`` constant over a step is the
first-order update (DDIM); 2M extrapolates it linearly from the previous evaluation, 3M quadratically from two
(the paper's Algorithm 2 and diffusers' ``DPMSolverMultistepScheduler`` updates; ``h = lambda_t - lambda_s``):

    x_t = (beta_t / beta_s) x_s + alpha_t (1 - e^-h) D,    D = (1 + 1 / 2r) m_s - (1 / 2r) m_prev,  r = h_prev / h.

The first steps use lower orders (there are no earlier evaluations yet), and with ``lower_order_final`` grids of
fewer than 15 steps take their last step at first order (diffusers' default): a step to t = 1 (``beta_t = 0``,
``h = inf``) is then exactly the data prediction.
"""

from __future__ import annotations

import math

import torch

from flowdiff.errors import check_choice
from flowdiff.samplers.base import CountedField, Sampler, SampleResult
from flowdiff.utils import full_time


def _log_snr(path, t: float) -> tuple[float, float, float]:
    """``alpha_t, beta_t, lambda_t`` in float64 (``lambda = +-inf`` at the ends)."""
    s = path.schedule(torch.tensor([t], dtype=torch.float64))
    alpha, beta = float(s.alpha), float(s.beta)
    lam = math.inf if beta == 0 else -math.inf if alpha == 0 else math.log(alpha) - math.log(beta)
    return alpha, beta, lam


class DPMSolverPlusPlusSampler(Sampler):
    """DPM-Solver++(2M) (``order=2``) or (3M) (``order=3``): one evaluation of the data prediction per step."""

    fields = ("data",)

    def __init__(
        self,
        order: int = 2,
        lower_order_final: bool = True,
        steps: int = 20,
        **common,  # t_min, t_max, denoise, grid, rho, shift: the Sampler's
    ) -> None:
        super().__init__(steps, **common)
        check_choice("order", order, (1, 2, 3))
        self.order, self.lower_order_final = int(order), bool(lower_order_final)

    def integrate(
        self, velocity_fn, x0, times, *, score_fn=None, data_fn=None, path=None, return_trajectory=False, generator=None
    ):
        if path is None or data_fn is None:
            raise ValueError("DPM-Solver++ steps in the log-SNR of a Gaussian path: it needs the path and data_fn")
        data = CountedField(data_fn)
        ts = times.tolist()
        coeffs = [_log_snr(path, t) for t in ts]
        n = len(ts) - 1
        x, traj = x0, [x0] if return_trajectory else None
        history: list[tuple[torch.Tensor, float]] = []  # (m_i, lambda_i), the latest last
        for i in range(n):
            (_, beta_s, lam_s), (alpha_t, beta_t, lam_t) = coeffs[i], coeffs[i + 1]
            m = data(x, full_time(ts[i], x.shape[0], x))
            history = [*history[-2:], (m, lam_s)]
            order = min(self.order, len(history))
            if self.lower_order_final and n < 15 and i == n - 1:
                order = 1
            if self.order == 3 and self.lower_order_final and n < 15 and i == n - 2:
                order = min(order, 2)
            if beta_t == 0:  # to the data: e^-h = 0 and beta_t / beta_s = 0
                x = alpha_t * m
            else:
                x = self._step(x, history[-order:], beta_t / beta_s, alpha_t, lam_s, lam_t)
            if traj is not None:
                traj.append(x)
        return SampleResult(x, times, data.calls, torch.stack(traj) if traj is not None else None)

    @staticmethod
    def _step(x, history, ratio: float, alpha_t: float, lam_s: float, lam_t: float):
        """One update of order ``len(history)`` from ``s`` (the last of ``history``) to ``t``."""
        h = lam_t - lam_s
        m0, _ = history[-1]
        phi1 = -math.expm1(-h)  # 1 - e^-h (1 where the step starts at alpha_s = 0, h = inf)
        lams = [lam for _, lam in history]
        if len(history) == 1 or any(math.isinf(v) for v in lams):
            return ratio * x + alpha_t * phi1 * m0
        if len(history) == 2:
            m1, lam1 = history[0]
            r = (lam_s - lam1) / h
            return ratio * x + alpha_t * phi1 * ((1 + 0.5 / r) * m0 - (0.5 / r) * m1)
        (m2, lam2), (m1, lam1) = history[0], history[1]
        h0, h1 = lam_s - lam1, lam1 - lam2
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        em1 = math.expm1(-h)  # e^-h - 1
        return ratio * x - alpha_t * em1 * m0 + alpha_t * (em1 / h + 1) * d1 - alpha_t * ((em1 + h) / h**2 - 0.5) * d2
