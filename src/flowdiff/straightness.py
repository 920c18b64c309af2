"""How straight a flow is along its own trajectories (course: flow straightening; Liu et al. 2023, rectified flow):

    S(v) = E_{X_0} (1 / L) int_{t0}^{t1} || (X_{t1} - X_{t0}) / L - v_t(X_t) ||^2 dt,
    dX_t = v_t(X_t) dt,  L = t1 - t0.

``S = 0`` exactly when every trajectory is a straight line travelled at constant speed, which is when one Euler
step from ``t0`` to ``t1`` is exact; the larger ``S``, the more steps a sampler needs. Over ``[0, 1]`` it is the
course's ``E int ||(X_1 - X_0) - v(X_t, t)||^2 dt``.

The trajectory is integrated with ``steps`` Euler steps and the integral is the matching Riemann sum, so that on
the discrete trajectory ``X_{t1} - X_{t0} = L * mean_k v_k`` and ``S`` is the mean squared deviation of the
velocities seen along a path from their average: exactly 0 for a field that is constant along its straight paths,
at any number of steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowdiff.samplers import EulerSampler, time_grid

FieldFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def straightness(
    velocity: FieldFn, x0: Tensor, t_span: tuple[float, float] = (0.0, 1.0), steps: int = 100
) -> tuple[float, Tensor]:
    """``(S, x_end)``: the straightness of ``velocity`` from the starting points ``x0`` ``(B, ...)`` over
    ``t_span``, and where the ``steps``-step Euler trajectories end."""
    if steps < 1:
        raise ValueError(f"straightness needs at least one step, got {steps}")
    times = time_grid(steps, float(t_span[0]), float(t_span[1]), device=x0.device, dtype=x0.dtype)
    traj = EulerSampler(steps).integrate(velocity, x0, times, return_trajectory=True).trajectory  # (steps + 1, B, ...)
    h = times.diff().view(-1, *[1] * x0.dim())
    vs = traj.diff(dim=0) / h  # (steps, B, ...): the velocity each Euler step took
    chord = vs.mean(0, keepdim=True)  # (X_{t1} - X_{t0}) / L on the discrete trajectory
    per_path = (vs - chord).pow(2).flatten(2).sum(2).mean(0)  # (B,)
    return float(per_path.mean()), traj[-1]
