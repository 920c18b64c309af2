"""Noise schedules ``alpha_t, beta_t`` of a Gaussian probability path (course eq. for x_t = alpha_t z + beta_t eps).

Convention: t = 0 is noise (``alpha_0 = 0, beta_0 = 1``) and t = 1 is data
(``alpha_1 = 1, beta_1 = 0``). Each schedule is called on times of shape ``(B,)``
and returns ``alpha, beta, d_alpha, d_beta`` (each ``(B,)``), the derivatives in
closed form.

The ends are exact in the dtype in use: every formula is written so that t = 0 and t = 1 give
exactly 0 or 1 in float32 as in float64 (``cos(pi/2)`` is -4.4e-8 in float32, so the cosine
schedule's ``beta`` is ``sin(pi (1 - t) / 2)``). A sampler or conversion that divides by
``beta_1`` must then see the singularity, not a tiny number of the wrong sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScheduleValues:
    """``alpha_t, beta_t`` and their time derivatives, each of shape ``(B,)``."""

    alpha: Tensor
    beta: Tensor
    d_alpha: Tensor
    d_beta: Tensor


class Schedule:
    """Base class: subclasses implement :meth:`__call__`."""

    def __call__(self, t: Tensor) -> ScheduleValues:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class CondOTSchedule(Schedule):
    """Conditional optimal-transport (linear) path: ``alpha_t = t, beta_t = 1 - t``."""

    def __call__(self, t: Tensor) -> ScheduleValues:
        one = torch.ones_like(t)
        return ScheduleValues(t, 1 - t, one, -one)


class CosineSchedule(Schedule):
    """Cosine path: ``alpha_t = sin(pi t / 2), beta_t = cos(pi t / 2)`` (variance preserving).

    ``beta_t`` is computed as ``sin(pi (1 - t) / 2)``, exactly 0 at t = 1 in every dtype.
    """

    def __call__(self, t: Tensor) -> ScheduleValues:
        alpha, beta = torch.sin(0.5 * math.pi * t), torch.sin(0.5 * math.pi * (1 - t))
        return ScheduleValues(alpha, beta, 0.5 * math.pi * beta, -0.5 * math.pi * alpha)


class LinearVPSchedule(Schedule):
    """The DDPM / score-SDE variance-preserving schedule with linear ``b(s) = b_min + s (b_max - b_min)``.

    In the score-SDE paper's time ``s = 1 - t`` (s = 0 data):
    ``alpha = exp(-s^2 (b_max - b_min) / 4 - s b_min / 2)``, ``beta = sqrt(1 - alpha^2)``.
    Note ``alpha_0 = exp(-(b_max + b_min) / 4)`` (about 0.0066 for the defaults), not exactly 0,
    and ``d_beta`` diverges like ``1 / sqrt(1 - t)`` at t = 1.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min = beta_min
        self.beta_max = beta_max

    def __call__(self, t: Tensor) -> ScheduleValues:
        s = 1 - t
        delta = self.beta_max - self.beta_min
        alpha = torch.exp(-0.25 * s**2 * delta - 0.5 * s * self.beta_min)
        d_alpha = alpha * (0.5 * s * delta + 0.5 * self.beta_min)
        beta = torch.sqrt(torch.expm1(2 * torch.log(alpha)).abs())  # sqrt(1 - alpha^2), accurate near t = 1, +0 at 1
        return ScheduleValues(alpha, beta, d_alpha, -alpha * d_alpha / beta)


class PolynomialSchedule(Schedule):
    """``alpha_t = t^n, beta_t = 1 - t^n`` (n = 1 is CondOT)."""

    def __init__(self, n: float = 2.0) -> None:
        if n <= 0:
            raise ValueError(f"PolynomialSchedule needs n > 0, got {n}")
        self.n = n

    def __call__(self, t: Tensor) -> ScheduleValues:
        d = self.n * t ** (self.n - 1)
        return ScheduleValues(t**self.n, 1 - t**self.n, d, -d)


class SqrtSchedule(Schedule):
    """The course's lab-2 path: ``alpha_t = t, beta_t = sqrt(1 - t)``; ``d_beta`` diverges at t = 1."""

    def __call__(self, t: Tensor) -> ScheduleValues:
        beta = torch.sqrt(1 - t)
        return ScheduleValues(t, beta, torch.ones_like(t), -0.5 / beta)
