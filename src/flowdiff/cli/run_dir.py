"""The run directory, created and checked for writing before anything else (a Hydra callback; imports nothing heavy).

Hydra creates the run or sweep directory itself, after its callbacks' ``on_run_start`` / ``on_multirun_start``: a
directory under a read-only or missing mount would otherwise stop the command with a Python traceback from inside
Hydra, before flowdiff has said a word.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def unwritable(path: Path) -> str | None:
    """Create ``path`` (and its parents) and write a file in it; ``None`` if that worked, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create the run directory {path} ({err.strerror or err})"
    probe = path / f".flowdiff-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot write in the run directory {path} ({err.strerror or err})"
    return None


class RunDirectoryCheck(Callback):
    """Before a run (``hydra.run.dir``) or a multirun (``hydra.sweep.dir``) starts, create its directory and check
    that it takes files; on failure print one sentence (the path, the reason, the key to change) and exit 2."""

    def _check(self, directory: str, key: str) -> None:
        why = unwritable(Path(directory))
        if why is not None:
            fix = f"set {key}=<a writable folder> (or log_root=<one>, under which runs go by default)"
            print(f"config error: {why}: {fix}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")
