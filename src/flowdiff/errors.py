"""The errors flowdiff stops with in one sentence (``train.py`` prints them without a traceback)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A combination of config choices, a file or a value that cannot work; the message says what to change."""


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or Inf (``nan_policy=stop``); the message names the step and the last checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGUSR1 stopped training after a checkpoint was saved; the message says how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
