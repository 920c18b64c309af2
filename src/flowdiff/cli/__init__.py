"""Entry points behind ``train.py`` and ``sample.py``: building the pieces from a Hydra config."""

from __future__ import annotations

import hashlib
import os

from omegaconf import OmegaConf

MAX_JOB_DIR = 240  # characters; file systems refuse names over 255 bytes


def job_dir(override_dirname: str, num: int | str) -> str:
    """A multirun job's folder: its overrides (``objective=cfm,sampler=heun``) where they fit in a file name; else
    ``job<num>-<hash>-<the first characters>`` (the full list is in the job's ``.hydra/overrides.yaml``)."""
    name = str(override_dirname) or f"job{num}"
    if len(name) <= MAX_JOB_DIR:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"job{num}-{digest}-{name[: MAX_JOB_DIR - 20]}"


def device_count() -> int:
    """GPUs on this machine (at least 1); ``FLOWDIFF_DEVICE_COUNT`` overrides it (tests fake a GPU box with it)."""
    fake = os.environ.get("FLOWDIFF_DEVICE_COUNT")
    if fake:
        return int(fake)
    import torch

    return max(torch.cuda.device_count(), 1)


if not OmegaConf.has_resolver("flowdiff_job_dir"):
    OmegaConf.register_new_resolver("flowdiff_job_dir", job_dir)
if not OmegaConf.has_resolver("flowdiff_device_count"):
    OmegaConf.register_new_resolver("flowdiff_device_count", device_count)
