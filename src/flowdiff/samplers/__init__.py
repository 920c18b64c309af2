"""Samplers: fixed-step and adaptive ODE solvers, DDIM/DDPM, Euler-Maruyama, multistep consistency sampling; see
:func:`build_sampler`."""

from __future__ import annotations

from flowdiff.samplers.base import Sampler, SampleResult, time_grid
from flowdiff.samplers.consistency import ConsistencySampler
from flowdiff.samplers.ddim import DDIMSampler
from flowdiff.samplers.ode import Dopri5Sampler, EulerSampler, HeunSampler, MidpointSampler, RK4Sampler
from flowdiff.samplers.sde import EulerMaruyamaSampler, simulate_sde

SAMPLERS: dict[str, type[Sampler]] = {
    "euler": EulerSampler,
    "midpoint": MidpointSampler,
    "heun": HeunSampler,
    "rk4": RK4Sampler,
    "dopri5": Dopri5Sampler,
    "ddim": DDIMSampler,
    "euler_maruyama": EulerMaruyamaSampler,
    "consistency": ConsistencySampler,
}
_NEEDS_PATH = (DDIMSampler, EulerMaruyamaSampler, ConsistencySampler)


def build_sampler(name: str, path=None, **kwargs) -> Sampler:
    """Make the sampler ``name`` (a key of :data:`SAMPLERS`); DDIM and Euler-Maruyama also get the ``path``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    if issubclass(cls, _NEEDS_PATH):
        if path is None:
            raise ValueError(f"the {name} sampler needs the probability path")
        return cls(path, **kwargs)
    return cls(**kwargs)


__all__ = [
    "SAMPLERS",
    "ConsistencySampler",
    "DDIMSampler",
    "Dopri5Sampler",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "HeunSampler",
    "MidpointSampler",
    "RK4Sampler",
    "SampleResult",
    "Sampler",
    "build_sampler",
    "simulate_sde",
    "time_grid",
]
