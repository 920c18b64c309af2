"""Samplers: fixed-step and adaptive ODE solvers, DDIM/DDPM, DPM-Solver++, EDM's sampler, Euler-Maruyama, multistep
consistency sampling; every fixed-step one on a time grid of :mod:`flowdiff.samplers.grids`.

Each is one class built from ``conf/sampler/<name>.yaml`` (``_partial_: true`` for those that need the path, given at
build time); what a sampler needs and does it declares (``stochastic``, ``fields``, ``adaptive``,
``evaluations_per_step``), and the rules ask it.
"""

from __future__ import annotations

from flowdiff.samplers.base import Sampler, SampleResult, time_grid
from flowdiff.samplers.consistency import ConsistencySampler
from flowdiff.samplers.ddim import DDIMSampler
from flowdiff.samplers.edm import EDMSampler
from flowdiff.samplers.multistep import DPMSolverPlusPlusSampler
from flowdiff.samplers.ode import Dopri5Sampler, EulerSampler, HeunSampler, MidpointSampler, RK4Sampler
from flowdiff.samplers.sde import EulerMaruyamaSampler, simulate_sde

__all__ = [
    "ConsistencySampler",
    "DDIMSampler",
    "DPMSolverPlusPlusSampler",
    "EDMSampler",
    "Dopri5Sampler",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "HeunSampler",
    "MidpointSampler",
    "RK4Sampler",
    "SampleResult",
    "Sampler",
    "simulate_sde",
    "time_grid",
]
