"""Data-to-data interpolant ``x_t = alpha_t z + beta_t x_0 + sigma eps`` for a non-Gaussian source ``x_0``.

This is torchcfm's ``ConditionalFlowMatcher`` path (constant ``sigma``, 0.1 in its runner)
with any schedule: the conditional velocity is ``d_alpha z + d_beta x_0``. Since ``x_0`` is
not Gaussian, there is no score/noise/data algebra; only the velocity objective applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.paths.gaussian import PathSample
from flowdiff.paths.schedules import Schedule
from flowdiff.utils import broadcast_time


class NoisyInterpolantPath:
    """Interpolate source samples ``x_0`` to data ``z`` with a small Gaussian tube of width ``sigma``."""

    parameterisations: tuple[str, ...] = ("velocity",)

    def __init__(self, schedule: Schedule, sigma: float = 0.1) -> None:
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        self.schedule = schedule
        self.sigma = sigma

    def __repr__(self) -> str:
        return f"NoisyInterpolantPath({self.schedule!r}, sigma={self.sigma})"

    def sample(self, z: Tensor, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Draw ``x_t`` for data ``z``, source ``x0`` and ``t`` of shape ``(B,)``."""
        s = self.schedule(t)
        alpha, beta, d_alpha, d_beta = (broadcast_time(v, z) for v in (s.alpha, s.beta, s.d_alpha, s.d_beta))
        x_t = alpha * z + beta * x0
        if self.sigma > 0:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            x_t = x_t + self.sigma * noise
        return PathSample(x_t=x_t, t=t, velocity=d_alpha * z + d_beta * x0)

    def convert(self, prediction: Tensor, src: str, dst: str, x_t: Tensor, t: Tensor) -> Tensor:
        if src != dst:
            raise ValueError(
                f"a data-to-data path cannot convert {src} into {dst}: "
                "with a non-Gaussian source only the velocity (cfm) objective and ODE samplers apply"
            )
        return prediction

    def time_range(self, conversions=(), targets=(), margins=1e-3, dtype=torch.float32) -> tuple[float, float]:
        """``[0, 1]`` unless the schedule's derivatives diverge at an end; refuses non-velocity quantities."""
        for src, dst in conversions:
            self.convert(torch.zeros(1), src, dst, torch.zeros(1), torch.zeros(1))
        for name in targets:
            self.convert(torch.zeros(1), "velocity", name, torch.zeros(1), torch.zeros(1))
        m0, m1 = (margins, margins) if isinstance(margins, (int, float)) else margins
        ends = self.schedule(torch.tensor([0.0, 1.0], dtype=dtype))
        ok = torch.isfinite(ends.d_alpha) & torch.isfinite(ends.d_beta)
        return (0.0 if ok[0] else float(m0), 1.0 if ok[1] else 1.0 - float(m1))
