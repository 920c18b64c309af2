"""What the config files need before anything heavy loads: their resolvers (``${default:}``, the job folder, the GPU
count) and whether this is a multirun. Importing it imports Hydra and OmegaConf only (torch loads after composing)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

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


def class_default(*, _parent_, _node_) -> Any:
    """``key: ${default:}`` in a config node with a ``_target_``: the default of ``key`` in the target's signature.

    Defaults live once, in the class signature; a config file names the keys it lets the command line set (so that
    ``sampler.steps=10`` needs no ``+``) and gives a value only where it changes one. Resolved when the config is
    used (the target's module is imported then, after composing). A target that cannot be imported resolves its
    defaults to None, so that building it reports the target itself (Hydra's "Error locating target ...")."""
    import inspect

    from hydra.utils import get_object

    target, key = _parent_.get("_target_"), _node_._key()
    if target is None:
        raise ValueError(f"{key}: ${{default:}} needs a _target_ in the same config node")
    try:
        owner = get_object(target)
    except (ImportError, ValueError, AttributeError):
        return None
    parameter = inspect.signature(owner).parameters.get(key)
    for base in getattr(owner, "__mro__", ())[1:]:  # a setting passed on through **kwargs to a base class
        if parameter is not None:
            break
        if "__init__" in vars(base):
            parameter = inspect.signature(base).parameters.get(key)
    if parameter is None and hasattr(owner, "module_class"):  # a stage's settings that are its LightningModule's
        parameter = inspect.signature(owner.module_class).parameters.get(key)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise ValueError(f"{key}: {target} has no default for {key!r}, so ${{default:}} cannot stand for it")
    default = parameter.default
    return list(default) if isinstance(default, tuple) else default


def multirun() -> bool:
    """Whether this process is a job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if not OmegaConf.has_resolver("default"):
    OmegaConf.register_new_resolver("default", class_default)
if not OmegaConf.has_resolver("flowdiff_job_dir"):
    OmegaConf.register_new_resolver("flowdiff_job_dir", job_dir)
if not OmegaConf.has_resolver("flowdiff_device_count"):
    OmegaConf.register_new_resolver("flowdiff_device_count", device_count)
