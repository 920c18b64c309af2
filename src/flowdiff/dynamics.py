"""The course's lab-1 stochastic dynamics, as SDEs ``dX = f(X, t) dt + g(t) dW`` that
:func:`flowdiff.samplers.simulate_sde` runs.

* Brownian motion ``dX = sigma dW``: ``Var X_t = Var X_0 + sigma^2 t``.
* Ornstein-Uhlenbeck ``dX = -theta X dt + sigma dW``: stationary law ``N(0, sigma^2 / (2 theta))``.
* Langevin dynamics ``dX = sigma^2 / 2 * grad log p(X) dt + sigma dW``: stationary law ``p``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowdiff.samplers.base import SampleResult
from flowdiff.samplers.sde import score_drift, simulate_sde


class SDE:
    """Drift ``f(x, t)`` and diffusion ``g(x, t)``; :meth:`simulate` runs Euler-Maruyama on ``[0, t_end]``."""

    def drift(self, x: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def diffusion(self, x: Tensor, t: Tensor) -> float | Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def simulate(
        self,
        x0: Tensor,
        t_end: float,
        steps: int,
        *,
        return_trajectory: bool = False,
        generator: torch.Generator | None = None,
    ) -> SampleResult:
        times = torch.linspace(0.0, t_end, steps + 1, dtype=x0.dtype, device=x0.device)
        return simulate_sde(
            self.drift, self.diffusion, x0, times, return_trajectory=return_trajectory, generator=generator
        )


class BrownianMotion(SDE):
    """``dX = sigma dW``."""

    def __init__(self, sigma: float = 1.0) -> None:
        self.sigma = sigma

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, x, t):
        return self.sigma


class OrnsteinUhlenbeck(SDE):
    """``dX = -theta X dt + sigma dW``; stationary variance ``sigma^2 / (2 theta)``."""

    def __init__(self, theta: float = 1.0, sigma: float = 1.0) -> None:
        self.theta = theta
        self.sigma = sigma

    def drift(self, x, t):
        return -self.theta * x

    def diffusion(self, x, t):
        return self.sigma

    @property
    def stationary_variance(self) -> float:
        return self.sigma**2 / (2 * self.theta)


class LangevinDynamics(SDE):
    """``dX = sigma^2 / 2 * score(X) dt + sigma dW`` for a density with known ``score(x)``."""

    def __init__(self, score: Callable[[Tensor], Tensor], sigma: float = 0.6) -> None:
        self.score = score
        self.sigma = sigma

    def drift(self, x, t):
        return score_drift(0.0, self.score(x), self.sigma)

    def diffusion(self, x, t):
        return self.sigma


__all__ = ["SDE", "BrownianMotion", "LangevinDynamics", "OrnsteinUhlenbeck"]
