"""Compose the project's Hydra configs in tests, as train.py would."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

FAST = [
    "trainer.max_steps=6",
    "data.steps_per_epoch=3",
    "data.n_val=128",
    "data.n_test=128",
    "callbacks.metrics.n=128",
    "callbacks.plot.n=128",
    "callbacks.plot.n_trajectories=4",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]


def compose_cfg(overrides: list[str], run_dir: Path | str, config: str = "train") -> DictConfig:
    """The composed config with ``run_dir`` set, and Hydra's runtime config registered."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
        del cfg["hydra"]
    return cfg
