"""The errors flowdiff stops with in one sentence (``train.py`` prints them without a traceback)."""

from __future__ import annotations

from collections.abc import Callable


class ConfigError(ValueError):
    """A combination of config choices, a file or a value that cannot work; the message says what to change."""


class DataError(ConfigError):
    """Data that cannot be read as configured (missing, corrupt or of another format); the message names the files
    and the fix."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or Inf (``nan_policy=stop``); the message names the step and the last checkpoint."""


class TrainingInterrupted(RuntimeError):
    """A signal (SIGTERM, Ctrl-C, SIGUSR1) stopped training after a checkpoint was saved; the message says how to
    resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopNow(BaseException):
    """A second Ctrl-C: stop at once, without saving. A ``BaseException`` (not a ``KeyboardInterrupt``, which
    Lightning turns into its own shutdown), so that no ``except Exception`` on the way swallows it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class SettingError(ValueError):
    """A constructor argument outside its range (or not a number): ``name``, its ``value`` and what it must be.
    Whoever built the object from a config adds the key's path (``sampler.rtol=-1 is out of range: ...``)."""

    def __init__(self, name: str, value: object, requirement: str, why: str = "is out of range") -> None:
        super().__init__(f"{name}={value!r} {why}: set it to {requirement}")
        self.name, self.value, self.requirement = name, value, requirement


def check_setting(name: str, value: object, ok: Callable[[float], bool], requirement: str, whole: bool = False) -> None:
    """Raise :class:`SettingError` unless ``value`` is a number (a whole one if ``whole``) for which ``ok(value)``
    holds: one check, in the class whose argument it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(name, value, requirement, "is not a number")
    if whole and value != int(value):
        raise SettingError(name, value, requirement, "is not a whole number")
    if not ok(value):
        raise SettingError(name, value, requirement)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`SettingError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SettingError(name, value, " or ".join(choices), "is not a choice")
