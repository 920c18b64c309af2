"""Log-likelihood through the probability-flow ODE (course: the continuity equation; FFJORD, Grathwohl et al. 2019).

Along a solution of ``dX_t = u_t(X_t) dt`` the density changes as ``d/dt log p_t(X_t) = -div u_t(X_t)``, so

    log p_1(x_1) = log p_0(x_0) - int_0^1 div u_t(x_t) dt,

with ``x_0`` found by integrating the ODE backwards from the data point ``x_1`` (t = 1) to the noise
(t = 0), where ``p_0 = N(0, I)``. The divergence is exact (one autograd pass per dimension) for small
``d`` and Hutchinson's estimate ``E[e^T (du/dx) e]`` with fixed Rademacher probes ``e`` otherwise.
Integration is adaptive (dopri5, torchdiffeq) over the model's sampling range ``[t_min, t_max]``,
from the density its sampler starts from at ``t_min`` (``prior``: N(0, I) at t = 0, the moment-matched
Gaussian of ``p_t_min`` later). Where ``t_max < 1`` the data point is scored as the ODE's state at ``t_max``:
the sampler's last denoising step from ``t_max`` to 1 is not in the density (as in Song et al. 2021); the
caller states it.

For images in [-1, 1] from 8-bit pixels, :func:`bits_per_dim` applies uniform dequantisation
``x = 2 (pixel + U) / 256 - 1``, ``U ~ U[0, 1)``, so that ``bpd = (-log p(x) + D log(128)) / (D log 2)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torchdiffeq import odeint

FieldFn = Callable[[Tensor, Tensor], Tensor]


def divergence_exact(u: Tensor, x: Tensor) -> Tensor:
    """``sum_i du_i / dx_i`` per sample, ``(B,)``; ``u`` computed from ``x`` with the graph kept."""
    flat_u, div = u.flatten(1), torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat_u.shape[1]):
        grad = torch.autograd.grad(flat_u[:, i].sum(), x, retain_graph=True)[0]
        div = div + grad.flatten(1)[:, i]
    return div


def divergence_hutchinson(u: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate ``mean_k e_k^T (du/dx) e_k`` with probes ``(K, *x.shape)``, ``(B,)``."""
    est = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for k, e in enumerate(probes):
        vjp = torch.autograd.grad(u, x, e, retain_graph=k + 1 < len(probes))[0]
        est = est + (vjp * e).flatten(1).sum(1)
    return est / len(probes)


def gaussian_log_prob(x: Tensor, loc: Tensor | float = 0.0, scale: Tensor | float = 1.0) -> Tensor:
    """``log N(x; loc, diag(scale^2))`` per sample, ``(B,)``; ``loc`` and ``scale`` broadcast against ``x``."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    z = (x - loc) / scale
    log_scale = torch.log(scale).expand_as(x)
    return (-0.5 * z.pow(2) - log_scale - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def log_likelihood(
    velocity_fn: FieldFn,
    x1: Tensor,
    t_span: tuple[float, float] = (0.0, 1.0),
    exact: bool | None = None,
    probes: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    prior: Callable[[Tensor], Tensor] = gaussian_log_prob,
) -> tuple[Tensor, int]:
    """``(log p(x1) (B,), NFE)`` of data ``x1`` placed at ``t_max`` under the flow of ``velocity_fn`` from the
    density ``prior`` (``x -> log p(x)``, ``(B,)``) at ``t_min``.

    Args:
        exact: exact divergence (default: when a sample has at most 16 numbers), else Hutchinson.
        probes: Hutchinson probes per evaluation (Rademacher, fixed along the trajectory).
        prior: the density sampling starts from at ``t_min`` (default N(0, I)); :meth:`FlowModule.start_log_prob`
            is the moment-matched Gaussian a model's sampler draws from when ``t_min > 0``.
    """
    t_min, t_max = t_span
    exact = x1[0].numel() <= 16 if exact is None else exact
    eps = None
    if not exact:
        shape = (probes, *x1.shape)
        eps = torch.randint(0, 2, shape, generator=generator).to(x1.device, x1.dtype) * 2 - 1
    nfe = 0

    def field(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        x = state[0].detach()
        with torch.enable_grad():
            x.requires_grad_(True)
            u = velocity_fn(x, t.expand(x.shape[0]).to(x.dtype))
            div = divergence_exact(u, x) if exact else divergence_hutchinson(u, x, eps)
        return u.detach(), div.detach()

    times = torch.tensor([t_max, t_min], dtype=x1.dtype, device=x1.device)
    zero = torch.zeros(x1.shape[0], dtype=x1.dtype, device=x1.device)
    xs, delta = odeint(field, (x1, zero), times, rtol=rtol, atol=atol, method="dopri5")
    # delta(t_min) = int_{t_max}^{t_min} div dt = -int_{t_min}^{t_max} div dt
    return prior(xs[-1]) + delta[-1], nfe


def dequantize(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Images in [-1, 1] (8-bit pixels ``k / 255 * 2 - 1``) -> ``2 (k + U) / 256 - 1``, ``U ~ U[0, 1)``."""
    pixels = ((x + 1) / 2 * 255).round()
    u = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
    return 2 * (pixels + u) / 256 - 1


def bits_per_dim(log_prob: Tensor, dims: int) -> Tensor:
    """Bits per dimension of dequantised 8-bit data from ``log p(x)`` of ``x = 2 (k + U) / 256 - 1``."""
    return (-log_prob + dims * math.log(128)) / (dims * math.log(2))
