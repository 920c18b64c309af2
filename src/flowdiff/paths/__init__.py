"""Probability paths: schedules, the Gaussian path and the data-to-data interpolant."""

from flowdiff.paths.gaussian import PARAMETERISATIONS, GaussianPath, PathSample
from flowdiff.paths.interpolant import NoisyInterpolantPath
from flowdiff.paths.schedules import (
    SCHEDULES,
    CondOTSchedule,
    CosineSchedule,
    LinearVPSchedule,
    PolynomialSchedule,
    Schedule,
    ScheduleValues,
    SqrtSchedule,
)

__all__ = [
    "PARAMETERISATIONS",
    "SCHEDULES",
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
]
