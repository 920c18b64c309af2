"""Callbacks for image data: sample grids and FID / KID / class accuracy, at each validation round.

They run on the weights that validation sees, i.e. the EMA average when the EMA callback is on.
Under DDP the metric samples are split across ranks and torchmetrics reduces them once; grids and
files are written by rank 0 only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image

from flowdiff.callbacks.periodic import EveryNEpochs
from flowdiff.callbacks.sampling import final_validation
from flowdiff.data.images import to_unit
from flowdiff.errors import ConfigError
from flowdiff.labels import grid_rows, sampling_labels
from flowdiff.metrics.classifier import load_or_train_classifier
from flowdiff.metrics.images import (
    ClassifierFeatures,
    FeatureExtractor,
    FeatureFID,
    InceptionFeatures,
    MissingWeights,
    evaluation_settings,
    reference,
)
from flowdiff.progress import Advance, progress
from flowdiff.seeds import OFFSETS, stream_seed
from flowdiff.utils import rank_share

#: the first batch ``batch_size=None`` tries on a GPU (halved while it does not fit); on the CPU it is 500
AUTO_BATCH_GPU, AUTO_BATCH_CPU = 4096, 500


def sample_images(
    pl_module,
    n: int,
    y: Tensor | None,
    scale: float | None,
    seed: int,
    batch_size: int | None = None,
    sampler=None,
    start: int = 0,
    advance: Advance | None = None,
    timings: list[tuple[int, float]] | None = None,
) -> tuple[Tensor, int]:
    """Images ``start .. start + n - 1`` of the set ``seed``, in [-1, 1] on the CPU, and the NFE of one batch
    (``sampler=None``: the module's).

    Image ``j`` starts from its own noise (seed ``stream_seed("images", seed, j)``), so a set is the same whatever
    the batch size and however DDP ranks share it (exactly so for ODE samplers; an SDE's noise is drawn per batch).
    ``batch_size=None``: the largest batch that fits, from :data:`AUTO_BATCH_GPU` on a GPU, halved after an
    out-of-memory error (the batch is then drawn again), :data:`AUTO_BATCH_CPU` on the CPU.
    ``advance(k)`` is told of progress in images, ``k`` at a time, within a batch as the network is evaluated;
    ``timings`` receives ``(images, seconds)`` of each batch (the first one pays for compilation)."""
    sampler = sampler or pl_module.sampler
    on_gpu = pl_module.device.type == "cuda"
    auto = batch_size is None
    if auto:  # the size found to fit before, on this model
        batch_size = getattr(pl_module, "_fitting_batch", None) or (AUTO_BATCH_GPU if on_gpu else AUTO_BATCH_CPU)
    out, nfe, i = [], 0, 0
    while i < n:
        k = min(batch_size, n - i)
        first = start + i
        yy = None if y is None else y[i : i + k]
        x0 = torch.cat(
            [
                pl_module.draw_source(1, torch.Generator().manual_seed(stream_seed("images", seed, j)))
                for j in range(first, first + k)
            ]
        )
        g = torch.Generator().manual_seed(stream_seed("images/noise", seed, first))
        tick = _BatchProgress(advance, k, nfe or sampler.expected_nfe)
        began = time.perf_counter()
        try:
            result = pl_module.sample(
                k, sampler=sampler, y=yy, guidance_scale=scale, x0=x0, generator=g, on_evaluation=tick.evaluation
            )
        except torch.cuda.OutOfMemoryError:
            if not (auto and k > 1):
                raise
            result = None
        if result is None:  # out of memory: this batch again, half as large (outside the except: memory is freed)
            del x0
            if on_gpu:
                torch.cuda.empty_cache()
            batch_size = max(1, k // 2)
            pl_module.__dict__["_fitting_batch"] = batch_size
            if advance is not None and tick.told:
                advance(-tick.told)
            continue
        tick.done()
        out.append(result.x.float().cpu())  # waits for the device
        if timings is not None:
            timings.append((k, time.perf_counter() - began))
        nfe = result.nfe
        i += k
    return torch.cat(out), nfe


class _BatchProgress:
    """Progress within one batch of ``k`` images: ``k / expected`` per network evaluation (at most 99% of the batch
    before it ends), the rest when it ends."""

    def __init__(self, advance: Advance | None, k: int, expected: int | None) -> None:
        self.advance, self.k, self.told = advance, k, 0.0
        self.per_evaluation = k / expected if advance is not None and expected else 0.0

    def evaluation(self) -> None:
        step = min(self.per_evaluation, 0.99 * self.k - self.told)
        if step > 0:
            self.told += step
            self.advance(step)

    def done(self) -> None:
        if self.advance is not None:
            self.advance(self.k - self.told)


def resolve_features(features: str, datamodule, inception_weights: str | None = None) -> str | None:
    """The extractor ``features=auto`` stands for: the data's own classifier for labelled one-channel images
    (MNIST-like, where Inception's photographs say little); otherwise Inception when its weights file is there, else
    the data's own classifier when the data has labels, else ``None`` (no FID: nothing can make features)."""
    if features != "auto":
        if features not in ("inception", "classifier"):
            raise ConfigError(f"features={features} is unknown; choose auto, inception or classifier")
        return features
    labelled = datamodule.dataset_classes >= 2
    if labelled and datamodule.data_shape[0] == 1:
        return "classifier"
    if inception_weights and Path(inception_weights).expanduser().is_file():
        return "inception"
    return "classifier" if labelled else None


def build_extractor(
    features: str, datamodule, inception_weights: str | None = None, classifier_path: str | None = None
) -> tuple[FeatureExtractor, torch.nn.Module | None]:
    """``(extractor, classifier or None)`` for ``features`` = ``inception``, ``classifier`` or ``auto``
    (:func:`resolve_features`); ``auto`` with nothing to make features is a :class:`ConfigError`."""
    resolved = resolve_features(features, datamodule, inception_weights)
    if resolved == "inception":
        return InceptionFeatures(inception_weights), None
    if resolved == "classifier":
        clf = load_or_train_classifier(datamodule, classifier_path)
        acc = f"{clf.accuracy:.1%} test accuracy" if clf.accuracy is not None else "accuracy unknown"
        return ClassifierFeatures(clf, name=f"{datamodule.name} classifier ({acc})"), clf
    raise ConfigError(no_features_reason(datamodule))


def no_features_reason(datamodule) -> str:
    """Why ``features=auto`` makes no FID for this data, and how to turn it on."""
    return (
        f"no FID for data={datamodule.name}: it has no labels to train a classifier on and no Inception weights "
        "file was given; pass inception_weights=PATH (torch-fidelity's pt_inception-2015-12-05-6726825d.pth) to "
        "turn it on"
    )


def describe_sampler(sampler, scale: float | None) -> str:
    """``EulerSampler(steps=100, ...), w = 3`` (``w`` only for a guided model)."""
    return f"{sampler!r}" + ("" if scale is None else f", w = {scale:g}")


#: the fewest images FID and KID are computed on (KID's subsets hold half of them, and need two each)
MIN_N = 4


class ImageGrid(EveryNEpochs):
    """One grid per guidance scale: a row per class for a conditional model, ``n`` images otherwise.

    Saved as ``<run_dir>/grids/step<step>_w<scale>.png`` (and ``last_w<scale>.png``) and sent to
    TensorBoard and W&B.
    """

    data_kinds = ("image",)

    def __init__(
        self,
        per_class: int = 10,
        n: int = 64,
        guidance_scales: Sequence[float] | None = (1.0, 3.0, 5.0),
        seed: int = OFFSETS["grid"],
        every_n_epochs: int = 1,
        dirname: str = "grids",
    ) -> None:
        super().__init__(every_n_epochs)
        self.per_class, self.n, self.seed = per_class, n, seed
        self.guidance_scales = list(guidance_scales or [])
        self.dirname = dirname
        self.last_paths: list[Path] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.due(trainer) and trainer.is_global_zero:
            self.draw(trainer, pl_module)

    def draw(self, trainer, pl_module) -> list[Path]:
        num_classes = pl_module.num_classes
        y = grid_rows(num_classes, self.per_class)
        n = len(y) if y is not None else self.n
        nrow = self.per_class if y is not None else int(n**0.5)
        scales = self.guidance_scales if pl_module.guidance is not None and self.guidance_scales else [None]
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        step = trainer.global_step
        self.last_paths = []
        shown = ", ".join("unguided" if w is None else f"w = {w:g}" for w in scales)
        with progress(f"grids ({n} images at {shown}; {pl_module.sampler!r})", n * len(scales), trainer) as advance:
            for w in scales:
                images, _ = sample_images(pl_module, n, y, w, self.seed, advance=advance)
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


class ImageMetrics(EveryNEpochs):
    """Log ``val/fid``, ``val/kid`` and ``val/kid_std`` (and ``val/class_acc`` with a classifier) of ``n`` samples
    against ``n`` training images, next to ``val/fid_floor``, ``val/kid_floor`` and ``val/kid_floor_std`` (the same
    ``n`` real training images against ``n`` held-out ones).

    Under DDP each rank takes its contiguous share of the ``n`` real, held-out and generated images (the same images
    whatever the number of ranks); the metrics gather the shares and are computed once, the floor included.

    Args:
        n: generated, real and held-out images per evaluation (at most the size of each split).
        features: ``auto`` (:func:`resolve_features`), ``inception`` or ``classifier``.
        inception_weights: path of torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``.
        classifier_path: a classifier file (default: the cache, trained on first use).
        guidance_scale: the ``w`` of the evaluated samples (default: the model's).
        kid_subsets: KID's number of subsets (each of ``min(1000, n // 2)`` images).
        nfe: at the last validation of a run, also ``val/fid_nfe<k>`` (and ``val/class_acc_nfe<k>``) with the model's
            sampler at ``k`` steps for each ``k`` (Euler's for an adaptive solver): quality against NFE.
        extractor: a ready feature extractor (tests); overrides ``features``.
    """

    data_kinds = ("image",)
    monitors = {"val/fid": "min", "val/kid": "min", "val/class_acc": "max"}

    def __init__(
        self,
        n: int = 1000,
        features: str = "auto",
        inception_weights: str | None = None,
        classifier_path: str | None = None,
        guidance_scale: float | None = None,
        kid_subsets: int = 100,
        batch_size: int | None = None,
        seed: int = OFFSETS["fid samples"],
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
        self.active = True  # False: features=auto found nothing to make features with (see check)

    @property
    def name(self) -> str:
        return self.extractor.name if self.extractor is not None else self.features

    def check(self, datamodule) -> bool:
        """Build the feature extractor now, before training (a missing weights file or a classifier that does not
        fit is one sentence, :class:`ConfigError`; a missing classifier is trained and cached here, before any DDP
        process starts), and return whether the metrics will be computed: ``features=auto`` on unlabelled data
        without Inception weights turns FID off, with a line saying so, rather than stopping a run that did not ask
        for it."""
        sizes = {split: datamodule.split_size(split) for split in ("train", "val")}
        if not MIN_N <= self.n <= min(sizes.values()):
            raise ConfigError(
                f"callbacks.image_metrics.n={self.n} is out of range: set it between {MIN_N} and "
                f"{min(sizes.values())}; FID compares n samples with n of the {sizes['train']} training images of "
                f"data={datamodule.name}, and its floor those with n of the {sizes['val']} held-out ones"
            )
        if self.extractor is not None:
            return True
        features = resolve_features(self.features, datamodule, self.inception_weights)
        if features is None:
            rank_zero_only(print)(f"callbacks.image_metrics: {no_features_reason(datamodule)}", flush=True)
            self.active = False
            return False
        if features == "classifier" and self.classifier_path and Path(self.classifier_path).expanduser().is_file():
            stored = torch.load(Path(self.classifier_path).expanduser(), map_location="cpu", weights_only=False)
            have = (stored.get("in_channels"), stored.get("num_classes"))
            want = (datamodule.data_shape[0], datamodule.dataset_classes)
            if have[0] != want[0] or have[1] < want[1]:  # other channels, or labels it cannot predict
                raise ConfigError(
                    f"callbacks.image_metrics.classifier_path={self.classifier_path} reads {have[0]}-channel images "
                    f"of {have[1]} classes, but data={datamodule.name} has {want[0]} channels and {want[1]} classes: "
                    "drop classifier_path (one is trained for this data and cached) or use features=inception"
                )
        try:
            self.extractor, self.classifier = build_extractor(
                self.features, datamodule, self.inception_weights, self.classifier_path
            )
        except (MissingWeights, ValueError) as err:  # ValueError: a classifier for data without labels
            raise ConfigError(str(err)) from None
        return True

    def prepare(self, datamodule, device: torch.device, trainer=None) -> None:
        """Compute, once, this rank's share of the real features and the floor (building the extractor first if
        :meth:`check` has not). Under DDP every rank takes rank 0's classifier weights, so that all share one
        feature space even where each node trained its own."""
        if self.metric is not None or (self.extractor is None and not self.check(datamodule)):
            return
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.n < world:
            raise ConfigError(f"callbacks.image_metrics.n={self.n} is smaller than the {world} DDP ranks sharing it")
        if world > 1 and self.classifier is not None:
            self.classifier.load_state_dict(trainer.strategy.broadcast(self.classifier.state_dict(), src=0))
        mine = rank_share(self.n, rank, world)
        count = mine.stop - mine.start
        real, _ = datamodule.real_images(count, "train", offset=mine.start)
        held_out, _ = datamodule.real_images(count, "val", offset=mine.start)
        if rank == 0:
            shared = f"; split over {world} ranks" if world > 1 else ""
            print(f"image metrics: {evaluation_settings(self.n, self.kid_subsets, self.extractor.name)}{shared}")
        with progress("image metrics: real features", 2 * count, trainer, enabled=rank == 0) as advance:
            self.metric, self.floor = reference(
                self.extractor.to(device), real, held_out, self.kid_subsets, n=self.n, advance=advance
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        self.prepare(trainer.datamodule, pl_module.device, trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.prepare(trainer.datamodule, pl_module.device, trainer)

    def evaluate(self, pl_module, num_classes: int, trainer=None, sampler=None) -> dict[str, float]:
        """Generate this rank's share of the ``n`` samples (with ``sampler``, default the module's), update and
        compute (a collective under DDP); returns the metrics and ``nfe``."""
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = sampler or pl_module.sampler
        self.metric.reset_fake()
        mine = rank_share(self.n, rank, world)
        y_all = sampling_labels(self.n, num_classes)
        y = None if y_all is None else y_all[mine]
        scale = self.guidance_scale if self.guidance_scale is not None else getattr(pl_module.guidance, "scale", None)
        count = mine.stop - mine.start
        shown = f"{count} of {self.n} on this rank" if world > 1 else f"{self.n}"
        what = f"FID/KID samples ({shown}; {describe_sampler(sampler, scale if num_classes else None)})"
        began = time.perf_counter()
        with progress(what, count, trainer, enabled=rank == 0) as advance:
            images, nfe = sample_images(
                pl_module, count, y, self.guidance_scale, self.seed, self.batch_size, sampler, mine.start, advance
            )
        seconds = time.perf_counter() - began  # the images are on the CPU: the GPU has finished
        self.metric.update(images, real=False)
        out = self.metric.compute(n=self.n)
        out["nfe"] = nfe
        out["images_per_s"] = world * count / seconds  # all ranks together
        if self.classifier is not None and y is not None:
            correct = (self.classifier.predict(images) == y).float().sum()
            total = torch.tensor(float(len(y)))
            if world > 1:
                both = pl_module.all_gather(torch.stack([correct, total]).to(pl_module.device)).sum(0)
                correct, total = both[0], both[1]
            out["class_acc"] = float(correct / total)
        return out

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.due(trainer) or not self.active:
            return
        num_classes = pl_module.num_classes
        out = self.evaluate(pl_module, num_classes, trainer)
        out["nfe"] = float(out["nfe"])  # what one sample cost (the same on every rank)
        # the values are already reduced over the ranks (torchmetrics' sync, the gathered counts): every rank logs
        # the same number, so checkpoint callbacks monitoring val/fid find it on every rank
        sync = trainer.world_size > 1
        for key, value in out.items():
            pl_module.log(f"val/{key}", value, prog_bar=key == "fid", sync_dist=sync)
        for name, key in (("fid_floor", "fid"), ("kid_floor", "kid"), ("kid_floor_std", "kid_std")):
            pl_module.log(f"val/{name}", self.floor[key], sync_dist=sync)
        if self.nfe and final_validation(trainer):
            for k in self.nfe:
                out = self.evaluate(pl_module, num_classes, trainer, pl_module.sampler.with_steps(k))
                for key in ("fid", "class_acc"):
                    if key in out:
                        pl_module.log(f"val/{key}_nfe{k}", out[key], sync_dist=sync)


__all__ = ["ImageGrid", "ImageMetrics", "build_extractor", "sample_images"]
