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
import threading
from pathlib import Path

import lightning as L

from flowdiff.errors import StopNow, TrainingInterrupted

log = logging.getLogger("flowdiff")


class CheckpointOnSignal(L.Callback):
    """On SIGTERM, SIGINT (Ctrl-C), SIGUSR1 or SIGUSR2, finish the current training step (or validation round) and
    save ``<dirpath>/last.ckpt`` (atomically, through the trainer's checkpoint IO). Then:

    * for SIGUSR1/SIGUSR2, if a Python handler was installed before training (submitit's, under
      ``hydra/launcher=slurm``: it requeues the job and exits), call it: the requeued job restarts in the same run
      directory and resumes from that checkpoint;
    * else raise :class:`TrainingInterrupted`; ``train.py`` exits with ``128 + signum``. With ``requeue=true``
      inside a SLURM job, first ``scontrol requeue`` the job (for jobs started by plain ``sbatch``; never for Ctrl-C).

    Ctrl-C is handled unless the process started with SIGINT ignored (``cmd &`` in a shell script, for one).
    A second Ctrl-C stops at once without saving (even in the middle of writing the checkpoint, which then never
    replaces the previous one), by :class:`StopNow`, which ``except Exception`` cannot swallow. Under DDP every rank
    stops at the same step (the ranks agree on it every step: one small all-reduce). DataLoader workers, which
    inherit the handler, leave the decision to the training process. After ``fit`` the handler hands signals to
    the ones it replaced (Lightning's teardown reinstalls it).
    """

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, dirpath: str | Path, requeue: bool = False) -> None:
        self.dirpath = Path(dirpath)
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._active = False
        self._pid: int | None = None
        self._rank = 0

    def _handler(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker (forked with this handler): the training process decides
            return
        if not self._active:  # fit has ended: behave as the handler this one replaced
            return self._pass_on(signum, frame)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            self._restore()  # a third Ctrl-C is Python's own KeyboardInterrupt
            raise StopNow(
                f"SIGINT again: stopped without saving; {self.dirpath / 'last.ckpt'} holds the last checkpoint "
                "written whole (resume with ckpt_path=last and the same overrides)",
                signum,
            )
        if signum == signal.SIGINT and self.received is None and self._rank == 0:  # os.write: safe inside a handler
            os.write(
                2, b"\nCtrl-C: saving the step in progress, then stopping (Ctrl-C again stops now, without saving)\n"
            )
        self.received = self.received or signum

    def _pass_on(self, signum: int, frame) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: end the process as the signal would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self._pid, self._rank = None, os.getpid(), trainer.global_rank
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread
            log.warning("training runs outside the main thread: signals such as SIGTERM will not save a checkpoint")
            return
        self._previous = {}
        for s in self.signals:
            if s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN:  # started ignoring Ctrl-C: keep it so
                continue
            self._previous[s] = signal.signal(s, self._handler)
        self._active = True

    def _restore(self) -> None:
        self._active = False
        for s, h in self._previous.items():
            signal.signal(s, h)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _asked(self, trainer) -> int:
        """The signal any rank received (0: none); under DDP a collective, so every rank stops at the same step."""
        if trainer.world_size == 1:
            return self.received or 0
        import torch

        mine = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(mine, reduce_op="max"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_if_asked(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # a signal during a (long) evaluation
            self._stop_if_asked(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._stop_if_asked(trainer)

    def _stop_if_asked(self, trainer) -> None:
        signum = self._asked(trainer) if self._active else 0
        if not signum:
            return
        self.received = signum
        name = signal.Signals(signum).name
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        requeued = ""
        job = os.environ.get("SLURM_JOB_ID")
        if self.requeue and job and trainer.is_global_zero and signum != signal.SIGINT:  # Ctrl-C: a person
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
            done = subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
            requeued = f"; SLURM job {job} {'requeued' if done else 'could not be requeued'}"
        previous = self._previous.get(signum)
        handed_over = (signal.SIGUSR1, signal.SIGUSR2)  # to submitit's handler, which requeues the job and exits
        if signum in handed_over and callable(previous) and not requeued:
            log.info("%s: saved step %d to %s; handing over to %r", name, trainer.global_step, path, previous)
            self._restore()
            previous(signum, None)
        self._active = False  # stopping: a signal from now on is passed on, not taken for another save
        raise TrainingInterrupted(
            f"{name} received: saved step {trainer.global_step} to {path}{requeued}; resume with ckpt_path={path} "
            "(or ckpt_path=last with the same overrides)",
            signum,
        )
