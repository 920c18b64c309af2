"""Save before dying: SIGTERM (``kill``, the end of a SLURM time limit, preemption), SIGINT (Ctrl-C), SIGUSR1
(SLURM's ``--signal=USR1@90`` warning) and SIGUSR2 (submitit's preemption and time-out signal) write ``last.ckpt``
after the current step, then stop the run in one sentence, or hand over to the handler that was there before
(submitit's, which requeues the job). A second Ctrl-C stops at once, without saving: the checkpoint on disk is the
previous one, whole (checkpoints are written to a temporary file and renamed)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L

from flowdiff.errors import TrainingInterrupted

log = logging.getLogger("flowdiff")


class CheckpointOnSignal(L.Callback):
    """On SIGTERM, SIGUSR1 or SIGUSR2, finish the current training step and save ``<dirpath>/last.ckpt``
    (atomically, through the trainer's checkpoint IO). Then:

    * for SIGUSR1/SIGUSR2, if a Python handler was installed before training (submitit's, under
      ``hydra/launcher=slurm``: it requeues the job and exits), call it: the requeued job restarts in the same run
      directory and resumes from that checkpoint;
    * else raise :class:`TrainingInterrupted`; ``train.py`` exits with ``128 + signum``. With ``requeue=true``
      inside a SLURM job, first ``scontrol requeue`` the job (for jobs started by plain ``sbatch``).

    Ctrl-C (SIGINT, unless the process ignores it, as under ``nohup``) is handled as SIGTERM: exit 130 after saving.
    A second Ctrl-C stops at once without saving (even in the middle of writing the checkpoint, which then never
    replaces the previous one). Lightning's own SIGTERM handling (stop after the step, no checkpoint) and its
    KeyboardInterrupt "graceful shutdown" (stop without saving, exit 1) are replaced while ``fit`` runs.
    """

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, dirpath: str | Path, requeue: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            self._restore()  # a third Ctrl-C is Python's own KeyboardInterrupt
            raise TrainingInterrupted(
                f"SIGINT again: stopped without saving; {self.dirpath / 'last.ckpt'} is the checkpoint from before "
                "(resume with ckpt_path=last and the same overrides)",
                signum,
            )
        if signum == signal.SIGINT and self.received is None:
            print(
                "\nCtrl-C: saving the step in progress, then stopping (Ctrl-C again stops now, without saving)",
                file=sys.stderr,
                flush=True,
            )
        self.received = self.received or signum

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
            log.warning("training runs outside the main thread: signals such as SIGTERM will not save a checkpoint")
            return
        for s in self.signals:
            if s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN:  # nohup: Ctrl-C is meant to do nothing
                continue
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
        if self.requeue and job and trainer.is_global_zero and self.received != signal.SIGINT:  # Ctrl-C: a person
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
            requeued = f"; SLURM job {job} {'requeued' if done else 'could not be requeued'}"
        previous = self._previous.get(self.received)
        handed_over = (signal.SIGUSR1, signal.SIGUSR2)  # to submitit's handler, which requeues the job and exits
        if self.received in handed_over and callable(previous) and not requeued:
            log.info("%s: saved step %d to %s; handing over to %r", name, trainer.global_step, path, previous)
            self._restore()
            previous(self.received, None)
        raise TrainingInterrupted(
            f"{name} received: saved step {trainer.global_step} to {path}{requeued}; resume with ckpt_path={path} "
            "(or ckpt_path=last with the same overrides)",
            self.received,
        )
