"""Multistep consistency sampling (Song et al. 2023, algorithm 1), in the course's time (t = 1 is data).

With ``f(x, t)`` the model's data prediction (a consistency model's consistency function, see
:mod:`flowdiff.stages.consistency`) and ``k`` times ``t_0 < t_1 < ... < t_{k-1}`` evenly spaced from the start of
the span::

    x = f(x0, t_0);   for i = 1 .. k-1:  x = f(alpha_{t_i} x + beta_{t_i} eps_i, t_i),   eps_i ~ N(0, I)

One network evaluation per step: ``steps=1`` is one-step generation (NFE 1).
"""

from __future__ import annotations

import torch

from flowdiff.samplers.base import CountedField, Sampler, SampleResult
from flowdiff.utils import full_time


class ConsistencySampler(Sampler):
    """``steps`` evaluations of the data prediction, re-noising to the next time in between (needs a Gaussian path)."""

    fields = ("data",)

    def __init__(
        self,
        path,
        steps: int = 1,
        **common,  # t_min, t_max, denoise, grid, rho, shift: the Sampler's (a key it lacks is a TypeError)
    ) -> None:
        super().__init__(steps, **common)
        self.path = path

    @torch.no_grad()
    def sample(
        self,
        velocity_fn,
        x0,
        *,
        score_fn=None,
        data_fn=None,
        t_span=(0.0, 1.0),
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
        path=None,
    ) -> SampleResult:
        if data_fn is None:
            raise ValueError("the consistency sampler needs the model's data prediction (a Gaussian path)")
        f = CountedField(data_fn)
        times = self.times(x0, t_span, path or self.path)[:-1]  # (steps,) the times f is evaluated at
        x, path = x0, [x0] if return_trajectory else None
        for i, t in enumerate(times.tolist()):
            tb = full_time(t, x0.shape[0], x0)
            if i > 0:  # back onto the path at time t, with fresh noise
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = self.path.sample(x, eps, tb).x_t
            x = f(x, tb)
            if path is not None:
                path.append(x)
        out_times = torch.cat([times, times.new_ones(1)])
        return SampleResult(x, out_times, f.calls, torch.stack(path) if path is not None else None)
