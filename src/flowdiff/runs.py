"""One training run, start to end: build it, fit it (the process's signal handlers kept), write ``metrics.json``
and say where the plot, grids, checkpoint and metrics are; and, in a multirun, the GPU each job holds and the record
it leaves for the sweep's summary (:mod:`flowdiff.sweeps`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from flowdiff.build import build_callbacks, build_loggers, build_run
from flowdiff.callbacks import CheckpointOnSignal, ImageGrid, ImageMetrics, SamplePlot, Throughput
from flowdiff.checkpointing import AtomicCheckpointIO, check_weights_fit, read_checkpoint, resume_path
from flowdiff.configs import device_count, multirun
from flowdiff.errors import ConfigError
from flowdiff.metrics.images import fid_report, kid_report
from flowdiff.sweeps import JOB_RECORD

log = logging.getLogger("flowdiff")


def fit(cfg: DictConfig):
    """Build everything from ``cfg`` and fit; returns ``(module, datamodule, trainer, callbacks, seconds)``."""
    strategy = str(cfg.trainer.get("strategy", ""))
    if multirun() and "ddp" in strategy and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.strategy={strategy} inside a local -m sweep: Lightning starts a job's other processes by "
            "re-running the command line, which would start the whole sweep again in each; run DDP jobs one at a "
            "time (no -m), through hydra/launcher=slurm, or one GPU per job with hydra/launcher=gpus"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path = resume_path(cfg)
    module, datamodule = build_run(cfg)  # a stage's teacher is read here: a bad file is one sentence, now
    if ckpt_path is not None:  # a missing, truncated, foreign or mismatched file: one sentence, before Lightning
        check_weights_fit(module, read_checkpoint(ckpt_path, "ckpt_path"), ckpt_path, "ckpt_path")
    callbacks = build_callbacks(cfg, datamodule)
    loggers = build_loggers(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    per_device = int(cfg.data.batch_size)
    module.run_config["batch_size"] = {  # logged with the config: what one step sees in all
        "per_device": per_device,
        "devices": trainer.world_size,
        "global": per_device * trainer.world_size,
    }
    for logger in loggers:
        logger.log_hyperparams(module.run_config)  # the resolved config: every choice of the run
    if trainer.world_size > 1 and trainer.is_global_zero:
        log.info(
            "batch: %d per device x %d devices = %d per step; coupling: %r (%s)",
            per_device,
            trainer.world_size,
            per_device * trainer.world_size,
            module.coupling,
            "one plan over the global batch"
            if getattr(module.coupling, "global_batch", False)
            else "pairs within each device's batch",
        )
    start = time.perf_counter()
    with _signal_handlers_kept():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, datamodule, trainer, callbacks, time.perf_counter() - start


@contextlib.contextmanager
def _signal_handlers_kept():
    """The process's signal handlers as they were before ``fit``, whatever fit and Lightning's teardown left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in CheckpointOnSignal.signals}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one model; returns the final metrics (also written to ``<run_dir>/metrics.json``)."""
    module, _, trainer, callbacks, seconds = fit(cfg)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for c in callbacks:
        if isinstance(c, Throughput):
            metrics.update(c.result())
    metrics["train_seconds"] = seconds
    metrics["global_step"] = trainer.global_step
    if "val/nfe" in metrics:  # network evaluations per sample in the last validation round
        metrics["nfe"] = int(metrics.pop("val/nfe"))
    run_dir = Path(cfg.run_dir)
    if trainer.is_global_zero:  # one writer under DDP
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot = next((c.last_path for c in callbacks if isinstance(c, SamplePlot) and c.last_path), None)
    grids = next((c.last_paths for c in callbacks if isinstance(c, ImageGrid) and c.last_paths), [])
    image_metrics = next((c for c in callbacks if isinstance(c, ImageMetrics) and c.metric is not None), None)
    ckpt = trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
    if trainer.is_global_zero:
        lines = [f"run directory: {run_dir}"]
        if "val/w2" in metrics:
            floor = metrics.get("val/w2_floor", math.nan)
            lines.append(f"val/w2 = {metrics['val/w2']:.4f}  (finite-sample floor at this n: {floor:.4f})")
        if "val/fid" in metrics and image_metrics is not None:
            floor = image_metrics.floor or {}
            lines.append(
                "val/" + fid_report(metrics["val/fid"], floor.get("fid", math.nan), image_metrics.n, image_metrics.name)
            )
            if "val/kid" in metrics:
                kid = {"kid": metrics["val/kid"], "kid_std": metrics.get("val/kid_std", math.nan)}
                lines.append("val/" + kid_report(kid, floor, image_metrics.n, image_metrics.kid_subsets))
            if "val/images_per_s" in metrics:
                lines.append(f"val/FID samples drawn at {metrics['val/images_per_s']:.1f} images/s")
            if "val/class_acc" in metrics:
                lines.append(
                    f"val/class_acc = {metrics['val/class_acc']:.3f} (classifier's labels of class-conditional samples)"
                )
        if plot:
            lines.append(f"plot: {plot}")
        lines += [f"grid: {p}" for p in grids]
        if "perf/samples_per_s" in metrics:
            lines.append(
                f"throughput: {metrics['perf/samples_per_s']:.1f} samples/s ({metrics['perf/ms_per_step']:.1f} ms/step)"
            )
        lines += [f"checkpoint: {ckpt or 'none'}", f"metrics: {run_dir / 'metrics.json'}"]
        print("\n".join(lines), flush=True)
    return metrics


def claim_device(lock_dir: Path, count: int, first: int = 0, poll_s: float = 0.2) -> int:
    """A device index in ``[0, count)`` that no other job of the sweep holds: the first free one from ``first`` on,
    taken by creating ``<lock_dir>/<index>.lock`` exclusively (it holds the job's PID; the lock of a dead process
    is taken over). Waits while all are held."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for k in [(first + i) % count for i in range(count)]:
            lock = lock_dir / f"{k}.lock"
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = lock.read_text().strip()
                    if holder:  # empty: its job is writing its PID right now
                        os.kill(int(holder), 0)
                except ProcessLookupError:  # its job died without giving it back
                    lock.unlink(missing_ok=True)
                except (FileNotFoundError, PermissionError, ValueError):
                    pass
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return k
        time.sleep(poll_s)


@contextlib.contextmanager
def pinned_device(cfg: DictConfig):
    """Under a launcher whose jobs take a device each (``hydra/launcher=gpus``): hold one GPU for this job
    (``trainer.devices=[k]``) and yield ``k``; else ``None``."""
    if not (multirun() and getattr(get_class(HydraConfig.get().launcher._target_), "device_per_job", False)):
        yield None
        return
    hc = HydraConfig.get()
    count = device_count()
    lock_dir = Path(hc.sweep.dir) / ".devices"
    k = claim_device(lock_dir, count, first=int(hc.job.num) % count)
    try:
        if cfg.trainer.get("accelerator") != "cpu" and torch.cuda.is_available():
            with open_dict(cfg):
                cfg.trainer.devices = [k]
        log.info("job %s runs on device %d of %d", hc.job.num, k, count)
        yield k
    finally:
        (lock_dir / f"{k}.lock").unlink(missing_ok=True)


def write_job_record(cfg: DictConfig, record: dict) -> None:
    """``<run_dir>/job.json``: how this job ended, for the sweep summary (:mod:`flowdiff.sweeps`); rank 0 only."""
    if rank_zero_only.rank != 0:
        return
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if HydraConfig.initialized():
        record["job"] = HydraConfig.get().job.get("num")
    (run_dir / JOB_RECORD).write_text(json.dumps(record, indent=2, default=str))
