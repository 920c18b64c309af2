"""The errors flowdiff stops with in one sentence (``train.py`` prints them without a traceback)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A combination of config choices, a file or a value that cannot work; the message says what to change."""


class DataError(ConfigError):
    """Data that cannot be read as configured (missing, corrupt or of another format); the message names the files
    and the fix."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or Inf (``nan_policy=stop``); the message names the step and the last checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGUSR1 stopped training after a checkpoint was saved; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class SettingError(ValueError):
    """A constructor argument outside its range: ``name``, its ``value`` and what it must be. Whoever built the object
    from a config adds the key's path (``sampler.rtol=-1 is out of range: ...``)."""

    def __init__(self, name: str, value: object, requirement: str) -> None:
        super().__init__(f"{name}={value} is out of range: set it to {requirement}")
        self.name, self.value, self.requirement = name, value, requirement


def check_setting(name: str, value: object, ok: bool, requirement: str) -> None:
    """Raise :class:`SettingError` unless ``ok``: one check, in the class whose argument it is."""
    if not ok:
        raise SettingError(name, value, requirement)
