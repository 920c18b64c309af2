"""Callbacks for image data: sample grids and FID / KID / class accuracy, at each validation round.

They run on the weights that validation sees, i.e. the EMA average when the EMA callback is on.
Under DDP the metric samples are split across ranks and torchmetrics reduces them once; grids and
files are written by rank 0 only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import make_grid, save_image

from flowdiff.callbacks.sampling import final_validation
from flowdiff.data.images import to_unit
from flowdiff.errors import ConfigError
from flowdiff.metrics.classifier import load_or_train_classifier
from flowdiff.metrics.images import (
    ClassifierFeatures,
    FeatureExtractor,
    FeatureFID,
    InceptionFeatures,
    MissingWeights,
    reference,
)


def class_rows(num_classes: int, per_class: int) -> Tensor | None:
    """Labels for a grid with one row per class (``None`` for an unconditional model)."""
    if num_classes == 0:
        return None
    return torch.arange(num_classes).repeat_interleave(per_class)


def sample_images(
    pl_module,
    n: int,
    y: Tensor | None,
    scale: float | None,
    seed: int,
    batch_size: int = 500,
    sampler=None,
) -> tuple[Tensor, int]:
    """``n`` images in [-1, 1] on the CPU, drawn in batches with reproducible noise (batch ``i`` seeded ``seed + i``),
    and the NFE of one batch; ``sampler=None`` uses the module's."""
    out, nfe = [], 0
    for i in range(0, n, batch_size):
        k = min(batch_size, n - i)
        yy = None if y is None else y[i : i + k]
        g = torch.Generator().manual_seed(seed + i)
        result = pl_module.sample(k, sampler=sampler, y=yy, guidance_scale=scale, generator=g)
        out.append(result.x.float().cpu())
        nfe = result.nfe
    return torch.cat(out), nfe


def balanced_labels(n: int, num_classes: int) -> Tensor | None:
    """``0, 1, ..., C-1, 0, 1, ...`` (``n`` of them), or ``None`` without classes."""
    if num_classes == 0:
        return None
    return torch.arange(n) % num_classes


def resolve_features(features: str, datamodule) -> str:
    """``auto`` -> ``classifier`` for labelled one-channel images (MNIST-like), ``inception`` otherwise."""
    if features == "auto":
        return "classifier" if datamodule.data_shape[0] == 1 and datamodule.dataset_classes else "inception"
    return features


def build_extractor(
    features: str, datamodule, inception_weights: str | None = None, classifier_path: str | None = None
) -> tuple[FeatureExtractor, torch.nn.Module | None]:
    """``(extractor, classifier or None)`` for ``features`` = ``inception``, ``classifier`` or ``auto``
    (a classifier for one-channel images such as MNIST, Inception otherwise)."""
    features = resolve_features(features, datamodule)
    if features == "inception":
        return InceptionFeatures(inception_weights), None
    if features == "classifier":
        clf = load_or_train_classifier(datamodule, classifier_path)
        acc = f"{clf.accuracy:.1%} test accuracy" if clf.accuracy is not None else "accuracy unknown"
        return ClassifierFeatures(clf, name=f"{datamodule.name} classifier ({acc})"), clf
    raise ValueError(f"unknown features {features!r}; choose auto, inception or classifier")


class _EveryN(L.Callback):
    """An image callback that runs at every ``every_n_epochs``-th validation round (and on ``trainer.validate``)."""

    data_kinds: tuple[str, ...] = ("image",)

    def __init__(self, every_n_epochs: int) -> None:
        self.every_n_epochs = every_n_epochs

    def _due(self, trainer) -> bool:
        return (
            not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
            or (trainer.state.fn == "validate")
        )


class ImageGrid(_EveryN):
    """One grid per guidance scale: a row per class for a conditional model, ``n`` images otherwise.

    Saved as ``<run_dir>/grids/step<step>_w<scale>.png`` (and ``last_w<scale>.png``) and sent to
    TensorBoard and W&B.
    """

    def __init__(
        self,
        per_class: int = 10,
        n: int = 64,
        guidance_scales: Sequence[float] | None = (1.0, 3.0, 5.0),
        seed: int = 7,
        every_n_epochs: int = 1,
        dirname: str = "grids",
    ) -> None:
        super().__init__(every_n_epochs)
        self.per_class, self.n, self.seed = per_class, n, seed
        self.guidance_scales = list(guidance_scales or [])
        self.dirname = dirname
        self.last_paths: list[Path] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._due(trainer) and trainer.is_global_zero:
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> list[Path]:
        num_classes = trainer.datamodule.num_classes if pl_module.guidance is not None else 0
        y = class_rows(num_classes, self.per_class)
        n = len(y) if y is not None else self.n
        nrow = self.per_class if y is not None else int(n**0.5)
        scales = self.guidance_scales if pl_module.guidance is not None and self.guidance_scales else [None]
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        step = trainer.global_step
        self.last_paths = []
        for w in scales:
            images, _ = sample_images(pl_module, n, y, w, self.seed)
            grid = make_grid(to_unit(images), nrow=nrow, padding=2, pad_value=1.0)
            tag = "" if w is None else f"_w{w:g}"
            path = out / f"step{step:07d}{tag}.png"
            save_image(grid, path)
            save_image(grid, out / f"last{tag}.png")
            self.last_paths.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"samples{tag}", grid, global_step=step)
                elif isinstance(logger, WandbLogger):
                    logger.log_image(f"samples{tag}", images=[str(path)], step=step)
        return self.last_paths


class ImageMetrics(_EveryN):
    """Log ``val/fid``, ``val/kid`` (and ``val/class_acc`` with a classifier) of ``n`` samples against ``n``
    training images, next to ``val/fid_floor`` (the same ``n`` real training images against ``n`` held-out ones).

    Args:
        n: generated and real images per evaluation.
        features: ``auto`` (classifier for one-channel data, Inception otherwise), ``inception`` or ``classifier``.
        inception_weights: path of torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``.
        classifier_path: a classifier file (default: the cache, trained on first use).
        guidance_scale: the ``w`` of the evaluated samples (default: the model's).
        kid_subsets: KID's number of subsets.
        nfe: at the last validation of a run, also ``val/fid_nfe<k>`` (and ``val/class_acc_nfe<k>``) with the model's
            sampler at ``k`` steps for each ``k`` (Euler's for an adaptive solver): quality against NFE.
        extractor: a ready feature extractor (tests); overrides ``features``.
    """

    def __init__(
        self,
        n: int = 1000,
        features: str = "auto",
        inception_weights: str | None = None,
        classifier_path: str | None = None,
        guidance_scale: float | None = None,
        kid_subsets: int = 100,
        batch_size: int = 500,
        seed: int = 1234,
        every_n_epochs: int = 1,
        nfe: tuple[int, ...] = (),
        extractor: FeatureExtractor | None = None,
    ) -> None:
        super().__init__(every_n_epochs)
        self.nfe = tuple(int(k) for k in nfe or ())
        self.n, self.features, self.batch_size, self.seed = n, features, batch_size, seed
        self.inception_weights, self.classifier_path = inception_weights, classifier_path
        self.guidance_scale, self.kid_subsets = guidance_scale, kid_subsets
        self.extractor = extractor
        self.classifier: torch.nn.Module | None = None
        self.metric: FeatureFID | None = None
        self.floor: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return self.extractor.name if self.extractor is not None else self.features

    def check(self, datamodule) -> None:
        """Fail now, in one sentence (:class:`ConfigError`), if the extractor cannot be built."""
        features = resolve_features(self.features, datamodule)
        n_ref = len(datamodule)
        if not 1 <= self.n <= n_ref:
            raise ConfigError(
                f"callbacks.image_metrics.n={self.n} is out of range: set it between 1 and {n_ref}, the number of "
                f"training images data={datamodule.name} holds (the reference set)"
            )
        if (
            self.extractor is None
            and features == "classifier"
            and self.classifier_path
            and Path(self.classifier_path).expanduser().is_file()
        ):
            stored = torch.load(Path(self.classifier_path).expanduser(), map_location="cpu", weights_only=False)
            have = (stored.get("in_channels"), stored.get("num_classes"))
            want = (datamodule.data_shape[0], datamodule.dataset_classes)
            if have[0] != want[0] or have[1] < want[1]:  # other channels, or labels it cannot predict
                raise ConfigError(
                    f"callbacks.image_metrics.classifier_path={self.classifier_path} reads {have[0]}-channel images "
                    f"of {have[1]} classes, but data={datamodule.name} has {want[0]} channels and {want[1]} classes: "
                    "drop classifier_path (one is trained for this data and cached) or use features=inception"
                )
        if self.extractor is None and features == "inception":
            try:
                InceptionFeatures.check(self.inception_weights)
            except MissingWeights as err:
                raise ConfigError(str(err)) from None

    def prepare(self, datamodule, device: torch.device, rank: int = 0) -> None:
        """Build the extractor, cache the real features and the floor (once). Under DDP only rank 0 adds the real
        features, so the reduced statistics hold each real image once."""
        if self.metric is not None:
            return
        if self.extractor is None:
            self.extractor, self.classifier = build_extractor(
                self.features, datamodule, self.inception_weights, self.classifier_path
            )
        real, _ = datamodule.real_images(self.n, "train")
        held_out, _ = datamodule.real_images(self.n, "val")
        self.n_real = len(real)
        self.metric, self.floor = reference(self.extractor.to(device), real, held_out, self.kid_subsets, rank == 0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.prepare(trainer.datamodule, pl_module.device, trainer.global_rank)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.prepare(trainer.datamodule, pl_module.device, trainer.global_rank)

    def evaluate(self, pl_module, num_classes: int, rank: int = 0, world: int = 1, sampler=None) -> dict[str, float]:
        """Generate this rank's share of ``n`` samples (with ``sampler``, default the module's), update and compute
        (a collective under DDP)."""
        self.metric.reset_fake()
        share = range(rank, self.n, world)  # the same n images whatever the number of ranks
        y_all = balanced_labels(self.n, num_classes)
        y = None if y_all is None else y_all[list(share)]
        images, nfe = sample_images(
            pl_module, len(share), y, self.guidance_scale, self.seed + 7919 * rank, self.batch_size, sampler
        )
        if sampler is None:
            pl_module.sample_nfe = nfe
        self.metric.update(images, real=False)
        out = self.metric.compute(n=min(self.n, self.n_real))
        if self.classifier is not None and y is not None:
            correct = (self.classifier.predict(images) == y).float().sum()
            total = torch.tensor(float(len(y)))
            if world > 1:
                both = pl_module.all_gather(torch.stack([correct, total]).to(pl_module.device)).sum(0)
                correct, total = both[0], both[1]
            out["class_acc"] = float(correct / total)
        return out

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._due(trainer):
            return
        num_classes = trainer.datamodule.num_classes if pl_module.guidance is not None else 0
        out = self.evaluate(pl_module, num_classes, trainer.global_rank, trainer.world_size)
        # the values are already reduced over the ranks (torchmetrics' sync, the gathered counts): every rank logs
        # the same number, so checkpoint callbacks monitoring val/fid find it on every rank
        sync = trainer.world_size > 1
        for key, value in out.items():
            pl_module.log(f"val/{key}", value, prog_bar=key == "fid", sync_dist=sync)
        if self.floor is not None:
            pl_module.log("val/fid_floor", self.floor["fid"], sync_dist=sync)
        if self.nfe and final_validation(trainer):
            for k in self.nfe:
                steps = pl_module.sampler.with_steps(k)
                out = self.evaluate(pl_module, num_classes, trainer.global_rank, trainer.world_size, steps)
                for key in ("fid", "class_acc"):
                    if key in out:
                        pl_module.log(f"val/{key}_nfe{k}", out[key], sync_dist=sync)


__all__ = ["ImageGrid", "ImageMetrics", "balanced_labels", "build_extractor", "sample_images"]
