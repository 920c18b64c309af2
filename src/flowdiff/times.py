"""Training-time distributions: where on the path the loss is taken (the course's t: 0 noise, 1 data).

The objective's loss weighting is unchanged by the choice; only where times are drawn moves. Each distribution
draws ``u`` in [0, 1] and the objective maps it onto its finite range, ``t = lo + (hi - lo) u`` (the identity for
CondOT's velocity objective).

* :class:`UniformTimes`: ``u ~ U(0, 1)`` (the course, torchcfm; flowdiff's default).
* :class:`BetaTimes`: pi-0's (Black et al. 2024; openpi's ``sample_beta(1.5, 1) * 0.999 + 0.001`` with tau = 1 the
  noise end): ``tau ~ Beta(alpha, beta)``, ``u = s (1 - tau)`` with ``s = 0.999``, which puts more weight on the
  noisier times (lower t).
* :class:`LogitNormalTimes`: SD3's (Esser et al. 2024): ``u = sigmoid(loc + scale * n)``, ``n ~ N(0, 1)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class TimeDistribution:
    """``draw(n, generator, device, dtype) -> (n,)`` values ``u`` in [0, 1]; ``cdf(u)`` for checks."""

    def draw(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def cdf(self, u: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class UniformTimes(TimeDistribution):
    """``u ~ U(0, 1)``."""

    def draw(self, n, generator=None, device=None, dtype=torch.float32):
        return torch.rand(n, device=device, dtype=dtype, generator=generator)

    def cdf(self, u):
        return u.clamp(0, 1)


class BetaTimes(TimeDistribution):
    """pi-0's time distribution: ``tau ~ Beta(alpha, beta)`` at the noise end, ``u = s (1 - tau)``.

    Drawn by the inverse CDF of uniform draws, so a generator makes it reproducible (in closed form when
    ``beta = 1``: ``tau = v^(1/alpha)``; otherwise by SciPy's ``betaincinv``)."""

    def __init__(self, alpha: float = 1.5, beta: float = 1.0, s: float = 0.999) -> None:
        if alpha <= 0 or beta <= 0 or not 0 < s <= 1:
            raise ValueError(f"BetaTimes needs alpha, beta > 0 and s in (0, 1]: got {alpha}, {beta}, {s}")
        self.alpha, self.beta, self.s = float(alpha), float(beta), float(s)

    def draw(self, n, generator=None, device=None, dtype=torch.float32):
        where = generator.device if generator is not None else (device or "cpu")
        v = torch.rand(n, dtype=torch.float64, generator=generator, device=where)
        if self.beta == 1.0:
            tau = v.pow(1.0 / self.alpha)
        else:
            from scipy.special import betaincinv

            tau = torch.from_numpy(betaincinv(self.alpha, self.beta, v.cpu().numpy())).to(v.device)
        return (self.s * (1 - tau)).to(device=device, dtype=dtype)

    def cdf(self, u):
        from scipy.special import betainc

        # P(U <= u) = P(tau >= 1 - u / s)
        x = (1 - u.double() / self.s).clamp(0, 1)
        return torch.from_numpy(1 - betainc(self.alpha, self.beta, x.cpu().numpy())).to(u.device)


class LogitNormalTimes(TimeDistribution):
    """SD3's logit-normal: ``u = sigmoid(loc + scale * n)``, ``n ~ N(0, 1)``."""

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"LogitNormalTimes needs scale > 0, got {scale}")
        self.loc, self.scale = float(loc), float(scale)

    def draw(self, n, generator=None, device=None, dtype=torch.float32):
        z = torch.randn(n, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(self.loc + self.scale * z)

    def cdf(self, u):
        u = u.double().clamp(1e-300, 1 - 1e-16)
        z = (torch.log(u) - torch.log1p(-u) - self.loc) / self.scale
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))
