"""``python train.py ...``: one training run (:mod:`flowdiff.runs`), its failures told in one sentence and an exit
status, and a record of how it ended for the sweep's summary."""

from __future__ import annotations

import logging
import sys
import time

from omegaconf import DictConfig

from flowdiff.configs import multirun
from flowdiff.errors import ConfigError, NonFiniteLoss, StopNow, TrainingInterrupted
from flowdiff.runs import pinned_device, train, write_job_record

log = logging.getLogger("flowdiff")


def main(cfg: DictConfig) -> float | None:
    """Hydra task: one sentence on a bad combination; in a multirun a failed job does not stop the others.

    Every job leaves ``job.json`` (completed with its metrics, or failed with its one-line reason)."""
    start, started_at, device = time.perf_counter(), time.time(), None

    def record(status: str, reason: str = "", metrics: dict | None = None) -> None:
        seconds = time.perf_counter() - start
        write_job_record(
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
        if multirun():
            log.error("%s: %s", prefix, err)
            return None
        print(f"{prefix}: {err}", file=sys.stderr)
        sys.exit(code)
    except Exception as err:
        record("failed", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        if not multirun():
            raise
        log.exception("job failed; the multirun goes on")
        return None
    record("completed", metrics=metrics)
    # None (not NaN) when there is no value: Optuna's sweeper then marks the trial failed, where a NaN stops it
    return metrics.get(cfg.get("optimized_metric", "val/w2"))
