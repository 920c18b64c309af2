"""Densities with closed-form log-density and score: the Gaussian mixture of the course's labs.

Under a Gaussian path a mixture stays a mixture: if ``z ~ sum_k w_k N(mu_k, s_k^2 I)`` then
``x_t = alpha_t z + beta_t eps ~ sum_k w_k N(alpha_t mu_k, (alpha_t^2 s_k^2 + beta_t^2) I)``, so its
marginal score (and through the path its marginal velocity) is known exactly: a ground truth
for samplers and trained models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    """``sum_k w_k N(mu_k, s_k^2 I)`` with ``means`` ``(K, d)``, ``stds`` ``(K,)`` and ``weights`` ``(K,)``."""

    def __init__(self, means: Tensor, stds: Tensor | float = 1.0, weights: Tensor | None = None) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float32)
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float32).expand(k).clone()
        w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def symmetric(cls, n_modes: int = 5, std: float = 1.0, scale: float = 10.0, dim: int = 2) -> GaussianMixture:
        """Modes evenly spaced on a circle of radius ``scale`` (course lab 2: 5 modes, std 1, scale 10)."""
        angles = torch.arange(n_modes) * 2 * math.pi / n_modes
        means = torch.zeros(n_modes, dim)
        means[:, 0], means[:, 1] = scale * torch.cos(angles), scale * torch.sin(angles)
        return cls(means, std)

    @classmethod
    def random(cls, n_modes: int = 5, std: float = 0.75, scale: float = 15.0, dim: int = 2, seed: int = 3):
        """Means uniform in ``[-scale/2, scale/2]^d`` (course lab 1: 5 modes, std 0.75, scale 15, seed 3)."""
        g = torch.Generator().manual_seed(seed)
        return cls((torch.rand(n_modes, dim, generator=g) - 0.5) * scale, std)

    def to(self, device=None, dtype=None) -> GaussianMixture:
        return GaussianMixture(
            self.means.to(device, dtype), self.stds.to(device, dtype), self.weights.to(device, dtype)
        )

    def sample(
        self, n: int, generator: torch.Generator | None = None, stratified: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``n`` points ``(n, d)`` and their component labels ``(n,)``.

        ``stratified=True`` gives component ``k`` exactly ``floor(n w_k)`` points (the rest drawn by weight),
        in a random order: far lower finite-sample W2 between two draws when the modes are far apart.
        """
        if stratified:
            counts = torch.floor(n * self.weights).long()
            n_rest = n - int(counts.sum())
            rest = (
                torch.multinomial(self.weights, n_rest, replacement=True, generator=generator) if n_rest else counts[:0]
            )
            labels = torch.cat([torch.repeat_interleave(torch.arange(self.n_components), counts), rest])
            labels = labels[torch.randperm(n, generator=generator)]
        else:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator)
        return self.means[labels] + self.stds[labels, None] * eps, labels

    def _components(self, x: Tensor, alpha: Tensor | float, beta: Tensor | float):
        """Per-component log-weight + log-density ``(B, K)`` and the ``x - mean`` / var terms of the path marginal."""
        alpha = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1)  # (B or 1, 1)
        beta = torch.as_tensor(beta, dtype=x.dtype, device=x.device).reshape(-1, 1)
        means, stds, weights = (v.to(x.device, x.dtype) for v in (self.means, self.stds, self.weights))
        var = alpha**2 * stds[None] ** 2 + beta**2  # (B, K)
        diff = x[:, None, :] - alpha[:, :, None] * means[None]  # (B, K, d)
        d = x.shape[1]
        logp = torch.log(weights)[None] - 0.5 * (diff.pow(2).sum(-1) / var + d * torch.log(2 * math.pi * var))
        return logp, diff, var

    def log_prob(self, x: Tensor, alpha: Tensor | float = 1.0, beta: Tensor | float = 0.0) -> Tensor:
        """``log p(x)`` ``(B,)``; with ``alpha, beta`` (scalars or ``(B,)``) the log-density of the path marginal."""
        logp, _, _ = self._components(x, alpha, beta)
        return torch.logsumexp(logp, dim=1)

    def score(self, x: Tensor, alpha: Tensor | float = 1.0, beta: Tensor | float = 0.0) -> Tensor:
        """``grad_x log p(x)`` ``(B, d)`` (of the path marginal for given ``alpha, beta``)."""
        logp, diff, var = self._components(x, alpha, beta)
        resp = torch.softmax(logp, dim=1)  # (B, K)
        return -(resp[:, :, None] * diff / var[:, :, None]).sum(1)
