"""Checkpoints that survive crashes: atomic writes, one-sentence reads, and the run to resume.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file beside its target and renames it into
  place, so a crash or ``kill -9`` while saving never leaves a broken ``last.ckpt``.
* :func:`read_checkpoint` turns a missing, truncated or foreign file into one sentence (:class:`ConfigError`).
* :func:`resume_path` decides what ``train.py`` resumes from: ``ckpt_path=<file>``, ``ckpt_path=last`` (the latest
  run of the same overrides under ``log_root``), or the run directory's own ``last.ckpt`` when a requeued job
  restarts in it; a run directory that holds a finished run is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from flowdiff.errors import ConfigError

log = logging.getLogger("flowdiff")

LAST = "last.ckpt"
# overrides that do not make a run a different run: where it resumes from and how long it trains
RESUME_FREE_KEYS = ("ckpt_path", "trainer.max_steps", "run_dir")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp-<pid>`` beside the target, ``fsync``, then ``os.replace`` (atomic on POSIX).

    Lightning's own writer stages the file in fsspec's transaction, whose local backend writes into the system
    temporary directory and ``shutil.move``s it: a copy, which a crash can cut short, whenever ``/tmp`` is another
    filesystem than the logs (node-local ``/tmp`` and shared log folders on clusters), and no ``fsync``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class PeriodicCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_train_steps`` training steps and at no other time, so that ``kill -9``
    loses at most that many steps. Lightning's ModelCheckpoint would also write ``last.ckpt`` at every epoch end
    and when training ends (after EMA has copied its average into the live weights); the end-of-run ``last.ckpt``
    is the main checkpoint callback's, written after the final validation."""

    def __init__(self, dirpath: str | Path, every_n_train_steps: int = 500) -> None:
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps,
            save_top_k=0,
            save_last=True,
            enable_version_counter=False,
        )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        pass

    def on_exception(self, trainer, pl_module, exception) -> None:
        pass


def read_checkpoint(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at ``path`` written by ``train.py``; anything else is one sentence naming ``key``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist: pass the path of a .ckpt written by train.py")
    try:  # memory-mapped: checking a checkpoint before Lightning resumes from it does not read it all a second time
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated or not a torch file: pickle, zip and EOF errors alike
        raise ConfigError(
            f"{key}={path} cannot be read ({type(err).__name__}): it is truncated or not a checkpoint; "
            "use another one, e.g. an earlier file in the same checkpoints folder"
        ) from None
    if not isinstance(ckpt, dict) or "flowdiff_config" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(f"{key}={path} carries no flowdiff config: it was not written by train.py")
    return ckpt


def check_weights_fit(module: torch.nn.Module, ckpt: dict[str, Any], path: str | Path, key: str = "ckpt") -> None:
    """One sentence when the checkpoint's weights do not fit ``module`` (other keys, other shapes)."""
    mine = module.state_dict()
    theirs = ckpt["state_dict"]
    missing = sorted(set(mine) - set(theirs))
    extra = sorted(set(theirs) - set(mine))
    shapes = [k for k in mine if k in theirs and tuple(mine[k].shape) != tuple(theirs[k].shape)]
    if not (missing or extra or shapes):
        return
    if shapes:
        k = shapes[0]
        what = f"{k} is {tuple(theirs[k].shape)} there but {tuple(mine[k].shape)} here"
    else:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
    raise ConfigError(
        f"{key}={path}: its weights do not fit the network the config builds ({what}); use the config it was "
        "trained with (its net.* and data.* settings), or a file that was not edited"
    )


def _identity(overrides: list[str]) -> frozenset[str]:
    """The overrides that define a run: all but where it resumes from and how long it trains."""
    keep = set()
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key in RESUME_FREE_KEYS:
            continue
        keep.add(o.lstrip("+"))
    return frozenset(keep)


def current_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def latest_run_checkpoint(log_root: str | Path, overrides: list[str]) -> Path | None:
    """``last.ckpt`` of the most recent run under ``log_root`` (single runs and multirun jobs) whose command-line
    overrides equal ``overrides``, ignoring ``ckpt_path`` and ``trainer.max_steps``."""
    want = _identity(overrides)
    best: Path | None = None
    for saved in Path(log_root).glob("**/.hydra/overrides.yaml"):
        last = saved.parent.parent / "checkpoints" / LAST
        if not last.is_file():
            continue
        try:
            theirs = [str(o) for o in OmegaConf.load(saved)]
        except Exception:  # an unreadable record is not a candidate
            continue
        if _identity(theirs) == want and (best is None or last.stat().st_mtime > best.stat().st_mtime):
            best = last
    return best


def resume_path(cfg: DictConfig) -> str | None:
    """The checkpoint this run resumes from (see the module docstring), or ``None`` for a fresh start."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / "metrics.json").is_file():
        raise ConfigError(
            f"run_dir={run_dir} holds a finished run (metrics.json) that this run would overwrite: choose another "
            "hydra.run.dir, or continue that run with ckpt_path=last (it then writes to a new directory)"
        )
    ckpt = cfg.get("ckpt_path")
    own = run_dir / "checkpoints" / LAST
    if ckpt is None:
        if own.is_file():  # a preempted and requeued job that restarts in its own run directory
            log.info("resuming from %s, this run directory's own last checkpoint", own)
            return str(own)
        return None
    if str(ckpt) == "last":
        root = cfg.get("log_root") or run_dir.parent
        found = latest_run_checkpoint(root, current_overrides())
        if found is None:
            raise ConfigError(
                f"ckpt_path=last found no run of this config with checkpoints/{LAST} under {root}: drop ckpt_path to "
                "start afresh, or pass the checkpoint file itself"
            )
        log.info("ckpt_path=last: resuming from %s", found)
        return str(found)
    return str(ckpt)
