"""``python sample.py ckpt=...``: a trained model sampled and scored (:mod:`flowdiff.evaluation`); a bad setting is one
sentence and exit status 2."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from flowdiff.errors import ConfigError
from flowdiff.evaluation import sample


def main(cfg: DictConfig) -> float:
    try:
        metrics = sample(cfg)
        return metrics.get("w2", metrics.get("fid", float("nan")))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
