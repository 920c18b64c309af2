"""Compose the project's Hydra configs in tests, as train.py would."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import flowdiff.configs  # noqa: F401  (the ${default:} resolver of the config files)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# a policy run of a few steps: a tiny net, two rollout episodes of two network evaluations per chunk
POLICY_FAST = [
    "trainer.max_steps=4",
    "data.steps_per_epoch=4",
    "data.batch_size=16",
    "net.width=32",
    "net.depth=1",
    "callbacks.rollout.n_episodes=2",
    "sampler.steps=2",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]

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


def tiny_mnist(root: Path, n_train: int = 64, n_test: int = 32, folder: str = "MNIST") -> Path:
    """MNIST's idx files with ``n_train`` / ``n_test`` images: each class a bright bar at its own row."""
    import numpy as np

    from flowdiff.data.formats import write_mnist

    rng = np.random.default_rng(0)
    for train, n in ((True, n_train), (False, n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for k, c in enumerate(labels):
            images[k, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
        write_mnist(root, images, labels, train, folder)
    return root


def tiny_classifier(path: Path, in_channels: int = 1) -> Path:
    """A DigitClassifier with its initial weights, saved where ``classifier_path`` can point (tests only)."""
    import torch

    from flowdiff.metrics.classifier import DigitClassifier, save_classifier

    torch.manual_seed(0)
    save_classifier(DigitClassifier(in_channels, 10), path)
    return path


TINY_UNET = ["net=unet", "net.channels=[8,16]", "net.num_residual_layers=1", "net.t_embed_dim=8", "net.y_embed_dim=8"]
TINY_IMAGES = [
    "data.batch_size=8",
    "data.num_workers=0",
    "data.steps_per_epoch=2",
    "data.n_val=16",
    "trainer.max_steps=3",
    "sampler.steps=3",
    "callbacks.grid.per_class=2",
    "callbacks.grid.n=4",
    "callbacks.grid.guidance_scales=[1.0,3.0]",
    "callbacks.image_metrics.n=20",
    "callbacks.image_metrics.kid_subsets=5",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
]


class SlowSave(L.Callback):
    """A test callback (``+callbacks.slow_save._target_=helpers.SlowSave``, with ``tests/`` on ``PYTHONPATH``): once a
    signal was received, pickling its state in a checkpoint takes ``seconds``, in the middle of writing the file, and
    writes ``marker`` first, so a test can interrupt the save itself."""

    def __init__(self, marker: str, seconds: float = 20.0) -> None:
        self.marker, self.seconds = marker, seconds

    def setup(self, trainer, pl_module, stage) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        signalled = any(getattr(c, "received", None) for c in self.trainer.callbacks)
        return {"slow": _SlowToPickle(self.marker, self.seconds)} if signalled else {}


class _SlowToPickle:
    def __init__(self, marker: str, seconds: float) -> None:
        self.marker, self.seconds = marker, seconds

    def __reduce__(self):
        Path(self.marker).write_text("saving")
        time.sleep(self.seconds)
        return (str, ("slow",))


OBJECTIVE_FILES = sorted(p.stem for p in (CONF / "objective").glob("*.yaml"))
SAMPLER_FILES = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


def objective_from_conf(name: str, **settings):
    """``conf/objective/<name>.yaml`` built as ``objective=<name>`` would build it."""
    from flowdiff.build import build, conf_node

    return build(conf_node("objective", name, **settings), "objective")


def sampler_from_conf(name: str, path=None, **settings):
    """``conf/sampler/<name>.yaml`` built as ``sampler=<name>`` would build it (with ``path`` if it needs one)."""
    from flowdiff.build import build_sampler, conf_node

    return build_sampler(conf_node("sampler", name, **settings), path)


def objective_of(name: str, **settings):
    """An Objective predicting what ``conf/objective/<name>.yaml`` predicts, with the class's own defaults and
    ``settings`` (not the file's margins: :func:`objective_from_conf` builds those)."""
    from flowdiff.objectives import Objective

    return Objective(objective_from_conf(name).prediction, **settings)
