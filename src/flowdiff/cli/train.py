"""``python train.py ...``: compose, validate, train, report where the plot, checkpoint and metrics are."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from flowdiff.callbacks import (
    CheckpointOnSignal,
    DistributionMetrics,
    ImageGrid,
    ImageMetrics,
    SamplePlot,
    Throughput,
)
from flowdiff.checkpointing import AtomicCheckpointIO, check_weights_fit, read_checkpoint, resume_path
from flowdiff.cli import device_count
from flowdiff.cli.build import build_datamodule, build_module, load_teacher
from flowdiff.errors import ConfigError, NonFiniteLoss, StopNow, TrainingInterrupted
from flowdiff.metrics.images import fid_report, kid_report
from flowdiff.sweeps import JOB_RECORD

log = logging.getLogger("flowdiff")


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def build_callbacks(cfg: DictConfig, datamodule=None) -> list[L.Callback]:
    """Instantiate ``cfg.callbacks`` (entries set to null are off), in the order below.

    Callbacks made for one kind of data (``data_kinds``: the 2D plot and W2 for vectors, grids and FID for
    images) are dropped for the other, so one callback config serves both. Image metrics are checked against the
    data now (a missing weights file is one sentence, not an error after the first epoch); ones that cannot be
    computed and were not asked for explicitly are dropped with a line saying so.
    """
    data_kind = getattr(datamodule, "kind", None)
    specs = {k: v for k, v in (cfg.get("callbacks") or {}).items() if v is not None}
    for name, spec in specs.items():
        if "_target_" not in spec:
            raise ConfigError(
                f"callbacks.{name} has settings but no _target_: set callbacks.{name}=null or give it one"
            )
    # EMA after the callbacks that sample in validation (they must see its average before it swaps back), and the
    # checkpoint writers after EMA (a checkpoint of step N holds EMA's update of step N: resumes are exact)
    callbacks = sorted(
        (instantiate(spec) for spec in specs.values()),
        key=lambda c: 2 if isinstance(c, (ModelCheckpoint, CheckpointOnSignal)) else isinstance(c, WeightAveraging),
    )
    callbacks = [c for c in callbacks if data_kind is None or data_kind in getattr(c, "data_kinds", (data_kind,))]
    callbacks = [c for c in callbacks if datamodule is None or not isinstance(c, ImageMetrics) or c.check(datamodule)]
    for c in callbacks:  # monitor=auto: the headline metric of the data kind, if a callback computes it
        if isinstance(c, ModelCheckpoint) and c.monitor == "auto":
            metric = {"vector": (DistributionMetrics, "val/w2"), "image": (ImageMetrics, "val/fid")}.get(data_kind)
            found = metric is not None and any(isinstance(o, metric[0]) for o in callbacks)
            c.monitor = metric[1] if found else None
            c.save_top_k = c.save_top_k if found else 1
    return callbacks + [_ValidateLastStep()]


class _ValidateLastStep(L.Callback):
    """Ends training through ``trainer.should_stop`` at ``max_steps``: Lightning then validates that very step (as
    for early stopping), so metrics, plots, grids and ``last.ckpt`` describe the final weights even when
    ``max_steps`` is not a multiple of the epoch length."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for spec in (cfg.get("logger") or {}).values():
        if spec is None:
            continue
        if "WandbLogger" in spec.get("_target_", ""):
            with open_dict(spec):
                if _multirun():
                    hc = HydraConfig.get()
                    spec.group = spec.group or Path(hc.sweep.dir).name
                    spec.name = spec.name or (hc.job.override_dirname or f"job{hc.job.num}")
        loggers.append(instantiate(spec))
    return loggers


def fit(cfg: DictConfig):
    """Build everything from ``cfg`` and fit; returns ``(module, datamodule, trainer, callbacks, seconds)``."""
    strategy = str(cfg.trainer.get("strategy", ""))
    if _multirun() and "ddp" in strategy and "SLURM_NTASKS" not in os.environ:
        raise ConfigError(
            f"trainer.strategy={strategy} inside a local -m sweep: Lightning starts a job's other processes by "
            "re-running the command line, which would start the whole sweep again in each; run DDP jobs one at a "
            "time (no -m), through hydra/launcher=slurm, or one GPU per job with hydra/launcher=gpus"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path = resume_path(cfg)
    teacher = load_teacher(cfg)  # stages: the trained model they start from (a bad file: one sentence, now)
    datamodule = build_datamodule(cfg, teacher)
    module = build_module(cfg, datamodule, teacher)
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
    if getattr(module, "sample_nfe", None) is not None:
        metrics["nfe"] = module.sample_nfe  # network evaluations per sample in the last validation round
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
    """Under ``hydra/launcher=gpus``: hold one GPU for this job (``trainer.devices=[k]``) and yield ``k``; else
    ``None``."""
    if not (_multirun() and HydraConfig.get().runtime.choices.get("hydra/launcher") == "gpus"):
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


def _write_job_record(cfg: DictConfig, record: dict) -> None:
    """``<run_dir>/job.json``: how this job ended, for the sweep summary (:mod:`flowdiff.sweeps`); rank 0 only."""
    if rank_zero_only.rank != 0:
        return
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if HydraConfig.initialized():
        record["job"] = HydraConfig.get().job.get("num")
    (run_dir / JOB_RECORD).write_text(json.dumps(record, indent=2, default=str))


def main(cfg: DictConfig) -> float | None:
    """Hydra task: one sentence on a bad combination; in a multirun a failed job does not stop the others.

    Every job leaves ``job.json`` (completed with its metrics, or failed with its one-line reason)."""
    start, started_at, device = time.perf_counter(), time.time(), None

    def record(status: str, reason: str = "", metrics: dict | None = None) -> None:
        seconds = time.perf_counter() - start
        _write_job_record(
            cfg,
            {
                "status": status,
                "reason": reason,
                "seconds": seconds,
                "metrics": metrics or {},
                "device": device,
                "started_at": started_at,
                "ended_at": time.time(),
            },
        )

    try:
        with pinned_device(cfg) as device:
            metrics = train(cfg)
    except (TrainingInterrupted, StopNow) as err:  # the whole process was told to stop, multirun or not: 128 + signum
        record("interrupted", str(err))
        print(f"stopped: {err}", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except (ConfigError, NonFiniteLoss) as err:  # one sentence, no traceback: exit code 2 (config) or 3 (NaN loss)
        prefix, code = ("config error", 2) if isinstance(err, ConfigError) else ("stopped", 3)
        record("failed", f"{prefix}: {err}")
        if _multirun():
            log.error("%s: %s", prefix, err)
            return None
        print(f"{prefix}: {err}", file=sys.stderr)
        sys.exit(code)
    except Exception as err:
        record("failed", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        if not _multirun():
            raise
        log.exception("job failed; the multirun goes on")
        return None
    record("completed", metrics=metrics)
    # None (not NaN) when there is no value: Optuna's sweeper then marks the trial failed, where a NaN stops it
    return metrics.get(cfg.get("optimized_metric", "val/w2"))
