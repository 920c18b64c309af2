"""Probability paths: schedules, the Gaussian path and the data-to-data interpolant."""

from flowdiff.paths.gaussian import PARAMETERISATIONS, GaussianPath, PathSample
from flowdiff.paths.interpolant import NoisyInterpolantPath
from flowdiff.paths.schedules import (
    CondOTSchedule,
    CosineSchedule,
    LinearVPSchedule,
    PolynomialSchedule,
    Schedule,
    ScheduleValues,
    SqrtSchedule,
)


def probability_path(schedule: Schedule, sigma: float = 0.0, gaussian_source: bool = True):
    """The path of ``schedule``: the Gaussian path (every parameterisation) for a Gaussian source with ``sigma = 0``,
    else torchcfm's noisy interpolant (velocity only) with a tube of width ``sigma``. ``gaussian_source`` comes from
    the data, at build time (configs build this with ``_partial_: true``)."""
    if gaussian_source and sigma == 0:
        return GaussianPath(schedule)
    return NoisyInterpolantPath(schedule, sigma=sigma)


__all__ = [
    "PARAMETERISATIONS",
    "CondOTSchedule",
    "CosineSchedule",
    "GaussianPath",
    "LinearVPSchedule",
    "NoisyInterpolantPath",
    "PathSample",
    "PolynomialSchedule",
    "Schedule",
    "ScheduleValues",
    "SqrtSchedule",
    "probability_path",
]
