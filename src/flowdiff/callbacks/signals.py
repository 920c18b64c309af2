"""Save before dying: SIGTERM (``kill``, the end of a SLURM time limit, preemption) and SIGUSR1 (SLURM's
``--signal=USR1@90`` warning) write ``last.ckpt`` after the current step, then stop the run in one sentence."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import lightning as L

from flowdiff.errors import TrainingInterrupted

log = logging.getLogger("flowdiff")


class CheckpointOnSignal(L.Callback):
    """On SIGTERM or SIGUSR1, finish the current training step, save ``<dirpath>/last.ckpt`` (atomically, through
    the trainer's checkpoint IO) and raise :class:`TrainingInterrupted`; ``train.py`` exits with ``128 + signum``.

    With ``requeue=true`` inside a SLURM job, ``scontrol requeue`` the job after saving: the restarted job
    resumes from that checkpoint (``ckpt_path=last``, or its own run directory's ``last.ckpt`` under the SLURM
    launcher). Lightning's own SIGTERM handling (stop after the step, no checkpoint) is replaced while ``fit`` runs.
    """

    signals = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, dirpath: str | Path, requeue: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.received is None:
            return
        name = signal.Signals(self.received).name
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        requeued = ""
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
            requeued = f"; SLURM job {job} {'requeued' if done else 'could not be requeued'}"
        raise TrainingInterrupted(
            f"{name} received: saved step {trainer.global_step} to {path}{requeued}; resume with ckpt_path={path} "
            "(or ckpt_path=last with the same overrides)",
            self.received,
        )
