"""The Gaussian conditional probability path ``x_t = alpha_t z + beta_t eps`` (course Section 3).

Every parameterisation of what a network may predict is a linear combination of
the data point ``z`` and the noise ``eps`` (``eps ~ N(0, I)``):

==========  =================================  ====================
name        conditional target                 ``(a_t, b_t)`` in ``a z + b eps``
==========  =================================  ====================
velocity    ``u = d_alpha z + d_beta eps``     ``(d_alpha, d_beta)``
score       ``grad log p_t(x|z) = -eps/beta``  ``(0, -1/beta)``
noise       ``eps``                            ``(0, 1)``
data        ``z``                              ``(1, 0)``
==========  =================================  ====================

Together with ``x = alpha z + beta eps`` a prediction of one kind fixes ``(z, eps)``
by a 2 x 2 solve, and so every other kind: this is the only place where
parameterisations are converted. Because the conditional targets are affine in
``(z, eps)`` and the marginal field is their conditional expectation, the same
algebra converts *marginal* predictions, e.g. the course's

    u_t(x) = (beta^2 d_alpha / alpha - d_beta beta) score_t(x) + (d_alpha / alpha) x.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from flowdiff.paths.schedules import Schedule
from flowdiff.utils import broadcast_time

Parameterisation = Literal["velocity", "score", "noise", "data"]
PARAMETERISATIONS: tuple[str, ...] = get_args(Parameterisation)


@dataclass(frozen=True)
class PathSample:
    """A draw from the path and its four conditional targets; tensors shaped like ``x_t`` but ``t`` ``(B,)``."""

    x_t: Tensor
    t: Tensor
    velocity: Tensor
    score: Tensor | None = None
    noise: Tensor | None = None
    data: Tensor | None = None

    def target(self, parameterisation: str) -> Tensor:
        value = getattr(self, parameterisation)
        if value is None:
            raise ValueError(f"this path has no {parameterisation} target; use the velocity (cfm) objective")
        return value


def _check(name: str) -> None:
    if name not in PARAMETERISATIONS:
        raise ValueError(f"unknown parameterisation {name!r}; choose one of {', '.join(PARAMETERISATIONS)}")


class GaussianPath:
    """``p_t(x | z) = N(alpha_t z, beta_t^2 I)`` for a :class:`Schedule` of ``alpha_t, beta_t``."""

    #: a Gaussian path knows all four targets; data-to-data interpolants only know the velocity
    parameterisations: tuple[str, ...] = PARAMETERISATIONS

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def __repr__(self) -> str:
        return f"GaussianPath({self.schedule!r})"

    def _schedule(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``alpha, beta, d_alpha, d_beta`` broadcast against ``like``."""
        s = self.schedule(t)
        return tuple(broadcast_time(v, like) for v in (s.alpha, s.beta, s.d_alpha, s.d_beta))

    @staticmethod
    def _coefficients(name: str, alpha: Tensor, beta: Tensor, d_alpha: Tensor, d_beta: Tensor) -> tuple:
        """``(a, b)`` such that the quantity ``name`` is ``a z + b eps``."""
        _check(name)
        if name == "velocity":
            return d_alpha, d_beta
        if name == "score":
            return torch.zeros_like(alpha), -1 / beta
        if name == "noise":
            return torch.zeros_like(alpha), torch.ones_like(alpha)
        return torch.ones_like(alpha), torch.zeros_like(alpha)  # data

    def sample(self, z: Tensor, eps: Tensor, t: Tensor, generator: torch.Generator | None = None) -> PathSample:
        """Draw ``x_t = alpha_t z + beta_t eps`` for data ``z``, noise ``eps`` (same shape) and ``t`` ``(B,)``.

        ``eps`` is the source sample: the coupling may have re-paired it with ``z``. Each target is
        ``a z + b eps`` with the coefficients of the table above. ``generator`` is unused (the draw is
        deterministic given ``eps``); it keeps the interface of :class:`NoisyInterpolantPath`.
        """
        sched = self._schedule(t, z)
        targets = {}
        for name in PARAMETERISATIONS:
            a, b = self._coefficients(name, *sched)
            targets[name] = a * z + b * eps
        alpha, beta = sched[:2]
        return PathSample(x_t=alpha * z + beta * eps, t=t, **targets)

    def noise_to_signal(self, t: Tensor) -> Tensor:
        """``beta_t / alpha_t``, EDM's noise level (its ``sigma``; here ``sigma_t`` is the SDE's diffusion coefficient):
        ``x_t / alpha_t = z + (beta_t / alpha_t) eps``. Infinite at t = 0 (where ``alpha_0 = 0``), 0 at t = 1,
        decreasing in between on every schedule."""
        s = self.schedule(t)
        return s.beta / s.alpha

    def time_at_noise_to_signal(self, ratio: Tensor, iterations: int = 60) -> Tensor:
        """The time ``t`` at which ``beta_t / alpha_t = ratio`` (bisection in float64; 0 for a ratio above the one at
        t = 0): how a grid or a distribution in EDM's sigma maps to the course's time on this path."""
        target = torch.as_tensor(ratio, dtype=torch.float64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            noisier = self.noise_to_signal(mid) > target
            lo, hi = torch.where(noisier, mid, lo), torch.where(noisier, hi, mid)
        return 0.5 * (lo + hi)

    def source_moments(
        self, t: float, like: Tensor, mean: Tensor | None = None, var: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loc, scale)`` of the Gaussian that sampling starts from at ``t > 0``: the first two moments of the
        marginal ``p_t``, ``N(alpha_t mean, (beta_t^2 + alpha_t^2 var) I)``, for data of per-coordinate ``mean`` and
        ``var`` (shaped like one sample); without them ``N(0, beta_t^2 I)``. On ``like``'s device and dtype."""
        s = self.schedule(torch.full((1,), float(t), dtype=like.dtype, device=like.device))
        if mean is None or var is None:
            return torch.zeros_like(s.beta), s.beta
        mean, var = mean.to(like), var.to(like)
        return s.alpha * mean, torch.sqrt(s.beta**2 + s.alpha**2 * var)

    def source_at(self, eps: Tensor, t: float, mean: Tensor | None = None, var: Tensor | None = None) -> Tensor:
        """Move a source draw ``eps ~ N(0, I)`` to the start time ``t > 0`` of sampling: ``loc + scale eps`` with the
        moments of :meth:`source_moments`."""
        loc, scale = self.source_moments(t, eps, mean, var)
        return loc + scale * eps

    def convert(self, prediction: Tensor, src: str, dst: str, x_t: Tensor, t: Tensor) -> Tensor:
        """Turn a ``src`` prediction at ``(x_t, t)`` into the ``dst`` one by exact algebra on the path:
        ``c_x x_t + c_p prediction`` with the coefficients of :meth:`conversion_coefficients`."""
        if src == dst:
            _check(src)
            return prediction
        c_x, c_p = self.conversion_coefficients(src, dst, t, x_t)
        return c_x * x_t + c_p * prediction

    def conversion_coefficients(self, src: str, dst: str, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_x, c_p)``, broadcast against ``like``, such that ``dst = c_x x_t + c_p src`` on this path.

        Solves ``[alpha beta; a b] [z; eps] = [x_t; prediction]`` for the quantity ``src = a z + b eps`` and
        returns the coefficients of ``dst = a' z + b' eps``. Singular where ``det = alpha b - beta a`` (or
        ``beta``, for dst = score) vanishes; :meth:`time_range` finds where. For ``dst = data`` at t = 1 they are
        exactly ``(1, 0)`` whenever finite (``alpha_1 = 1, beta_1 = 0``): the boundary condition
        ``f(x, 1) = x`` of a consistency function (:mod:`flowdiff.stages.consistency`).
        """
        _check(src)
        _check(dst)
        sched = self._schedule(t, like)
        alpha, beta = sched[:2]
        a, b = self._coefficients(src, *sched)
        a2, b2 = self._coefficients(dst, *sched)
        det = alpha * b - beta * a
        return (a2 * b - b2 * a) / det, (b2 * alpha - a2 * beta) / det

    def time_range(
        self,
        conversions: Iterable[tuple[str, str]] = (),
        targets: Iterable[str] = (),
        margins: float | tuple[float, float] = 1e-3,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[float, float]:
        """The interval ``[t_min, t_max]`` on which the ``(src, dst)`` conversions and the conditional
        ``targets`` are finite in ``dtype``.

        Each end is probed in ``dtype`` (the one the caller computes in) and pulled in by its margin,
        ``margins = (at t = 0, at t = 1)`` or one number for both, where a quantity is not finite there:
        the conversions divide by ``alpha_t`` (noise, score), ``beta_t`` (data, score) or
        ``alpha d_beta - beta d_alpha`` (velocity), and ``d_alpha, d_beta`` diverge at t = 1 for the
        sqrt and VP schedules. The schedules are exact at their ends in every dtype, so a singular end
        is seen as one.
        """
        conversions, targets = list(conversions), list(targets)
        for name in [n for pair in conversions for n in pair] + targets:
            _check(name)
        m0, m1 = (margins, margins) if isinstance(margins, (int, float)) else margins
        one = torch.ones(1, 1, dtype=dtype)

        def singular(t_end: float) -> bool:
            t = torch.full((1,), t_end, dtype=dtype)
            probe = self.sample(one, one, t)
            values = [probe.velocity] + [probe.target(n) for n in targets]
            values += [self.convert(one, src, dst, probe.x_t, t) for src, dst in conversions]
            return not all(bool(torch.isfinite(v).all()) for v in values)

        return (float(m0) if singular(0.0) else 0.0, 1.0 - float(m1) if singular(1.0) else 1.0)
