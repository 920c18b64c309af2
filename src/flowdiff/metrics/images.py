"""FID and KID of images through torchmetrics, with a feature extractor that is named and swappable.

* :class:`InceptionFeatures`: torch-fidelity's own ``FeatureExtractorInceptionV3`` (the network and the input
  pipeline of torch-fidelity, torchcfm and the TF1 reference: TF1's bilinear resize to 299, ``(x - 128) / 128``),
  read from a local weights file (``pt_inception-2015-12-05-6726825d.pth``); nothing is downloaded.
* :class:`ClassifierFeatures`: the penultimate layer of a small classifier trained on the data
  (:mod:`flowdiff.metrics.classifier`), an offline "classifier FID".
* :class:`FeatureFID` computes FID and KID (torchmetrics' ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``) from features computed once per image, so both metrics share them.
  Under DDP every rank updates with its own disjoint share of the real and the generated images, and
  ``compute`` gathers the shares (in rank order, so contiguous shares give the one-process order) once.

KID is the mean over ``kid_subsets`` random subsets of size ``min(kid_subset_size, n // 2)`` of each set, drawn
from a fixed seed (the global RNG is left untouched); ``kid_std`` is the spread over those subsets, i.e. of KID at
that subset size. Every FID should be printed beside its floor (FID between two disjoint real sets of the same
size, which no model can beat at that size) and the extractor's name; :func:`fid_report` formats that line.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from flowdiff.data.images import to_uint8
from flowdiff.progress import Advance

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class MissingWeights(FileNotFoundError):
    """A feature extractor's weights file is not where the config says; the message says what to fetch."""


class FeatureExtractor(nn.Module):
    """Images in [-1, 1] ``(B, C, H, W)`` -> features ``(B, num_features)``; ``name`` says which network."""

    name: str = "features"
    num_features: int = 0


class InceptionFeatures(FeatureExtractor):
    """The 2048-d pool features of torch-fidelity's InceptionV3: images in [-1, 1] become uint8 pixels (one channel
    repeated to RGB, as torch-fidelity's image loader does), which torch-fidelity resizes and scales itself."""

    num_features = 2048

    def __init__(self, weights_path: str | Path | None) -> None:
        super().__init__()
        path = self.check(weights_path)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
        self.name = f"InceptionV3 ({path.name})"

    @staticmethod
    def check(weights_path: str | Path | None) -> Path:
        """The weights file's path, or :class:`MissingWeights` saying what to fetch and where to put it."""
        path = Path(weights_path).expanduser() if weights_path else None
        if path is None or not path.is_file():
            raise MissingWeights(
                f"FID with Inception features needs torch-fidelity's weights file, not found at {path}: "
                f"fetch {INCEPTION_URL} on a machine with internet, save it as {INCEPTION_FILE} and pass its path "
                "as callbacks.image_metrics.inception_weights=PATH (train.py) or metrics.inception_weights=PATH "
                "(sample.py)"
            )
        return path

    def forward(self, x: Tensor) -> Tensor:
        u8 = to_uint8(x)
        if u8.shape[1] == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        return self.net(u8)[0]


class ClassifierFeatures(FeatureExtractor):
    """The penultimate layer of a trained :class:`~flowdiff.metrics.classifier.DigitClassifier`."""

    def __init__(self, classifier: nn.Module, name: str = "digit classifier") -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x)


class _Precomputed(nn.Module):
    """Hands features already computed to torchmetrics unchanged."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def kid_subset_size(n: int, largest: int = 1000) -> int:
    """KID's subset size for ``n`` images per set: at most half of them (so that the subsets differ and ``kid_std``
    is a spread), at most ``largest`` (torch-fidelity's and torchmetrics' 1000), at least 2."""
    return max(2, min(largest, n // 2))


class FeatureFID(nn.Module):
    """FID and KID between real and generated images in one feature space.

    Args:
        extractor: images -> features.
        kid_subset_size: the largest KID subset size (each compute uses :func:`kid_subset_size` of its ``n``).
        kid_subsets: KID's number of subsets (torchmetrics' default 100; its cost grows linearly).
        batch_size: images per extractor forward.
        seed: the KID subsets' seed (drawn in a forked RNG: the training stream is not touched).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        batch_size: int = 250,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.extractor = extractor.eval()
        self.batch_size = batch_size
        dim = extractor.num_features
        self.fid = FrechetInceptionDistance(feature=_Precomputed(dim), reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=_Precomputed(dim), subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False
        )
        self.kid_subset_size = kid_subset_size
        self.seed = seed

    @property
    def name(self) -> str:
        return self.extractor.name

    @torch.no_grad()
    def features(self, images: Tensor, advance: Advance | None = None) -> Tensor:
        """Features ``(N, D)`` (float64) of images ``(N, C, H, W)`` in [-1, 1], in batches, on the metric's device;
        ``advance(k)`` is told of each batch of ``k`` images (a progress bar)."""
        device = self.fid.device
        parts = []
        for i in range(0, len(images), self.batch_size):
            parts.append(self.extractor(images[i : i + self.batch_size].to(device)).double())
            if advance is not None:
                advance(len(parts[-1]))
        return (
            torch.cat(parts)
            if parts
            else torch.zeros(0, self.extractor.num_features, dtype=torch.float64, device=device)
        )

    def update_features(self, features: Tensor, real: bool) -> None:
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def update(self, images: Tensor, real: bool, advance: Advance | None = None) -> None:
        self.update_features(self.features(images, advance), real)

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real ones (their features are computed once)."""
        self.fid.reset()
        self.kid.reset()

    def compute(self, n: int | None = None) -> dict[str, float]:
        """``fid``, ``kid`` and ``kid_std`` over everything updated so far (gathered over DDP ranks: a collective).

        ``n``: the number of real and of generated images over all ranks (each set holds ``n``); by default this
        process's counts, right when a single process holds everything."""
        if n is None:
            n = min(int(self.fid.real_features_num_samples), int(self.fid.fake_features_num_samples))
        self.kid.subset_size = kid_subset_size(n, self.kid_subset_size)
        # torchmetrics draws KID's subsets with torch.randperm from the global CPU generator: seed it, and only it
        # (torch.manual_seed would reseed every CUDA generator too), inside a fork that restores its state
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def _on_extractors_device(extractor: FeatureExtractor, kid_subsets: int) -> FeatureFID:
    return FeatureFID(extractor, kid_subsets=kid_subsets).to(next(extractor.parameters(), torch.zeros(())).device)


def fid_between(extractor: FeatureExtractor, a: Tensor, b: Tensor, kid_subsets: int = 100) -> dict[str, float]:
    """FID and KID between two image sets (e.g. the floor: two disjoint real sets of the same size)."""
    metric = _on_extractors_device(extractor, kid_subsets)
    metric.update(a, real=True)
    metric.update(b, real=False)
    return metric.compute()


def reference(
    extractor: FeatureExtractor,
    real: Tensor,
    held_out: Tensor,
    kid_subsets: int = 100,
    n: int | None = None,
    advance: Advance | None = None,
) -> tuple[FeatureFID, dict[str, float]]:
    """A :class:`FeatureFID` holding the features of the ``real`` images (computed once) and the floor: FID and KID
    of ``real`` against ``held_out``, two disjoint real sets of the same size.

    Under DDP ``real`` and ``held_out`` are this rank's shares and ``n`` the size of each whole set: the floor is
    computed once over the gathered shares (a collective), each image counted once."""
    if len(real) != len(held_out):
        raise ValueError(f"the floor compares sets of one size, got {len(real)} real and {len(held_out)} held-out")
    metric = _on_extractors_device(extractor, kid_subsets)
    real_features = metric.features(real, advance)
    metric.update_features(real_features, real=True)
    floor = _on_extractors_device(extractor, kid_subsets)
    floor.update_features(real_features, real=True)
    floor.update(held_out, real=False, advance=advance)
    return metric, floor.compute(n)


def evaluation_settings(n: int, kid_subsets: int, extractor: str) -> str:
    """What an FID evaluation compares, printed when it starts."""
    return (
        f"FID/KID of {n} samples against {n} training images, floor {n} training vs {n} held-out; KID: "
        f"{kid_subsets} subsets of {kid_subset_size(n)}; features: {extractor}"
    )


def fid_report(fid: float, floor: float, n: int, extractor: str) -> str:
    """One line: the FID, its real-vs-real floor at the same ``n`` and the feature extractor."""
    return f"FID {fid:.2f} (real-vs-real floor {floor:.2f}; n = {n}; features: {extractor})"


def kid_report(kid: dict[str, float], floor: dict[str, float], n: int, subsets: int) -> str:
    """One line: KID and its floor (``{"kid", "kid_std"}`` each), mean and sd over the subsets named."""
    return (
        f"KID {kid['kid']:.4f} ± {kid['kid_std']:.4f} (real-vs-real floor {floor['kid']:.4f} ± {floor['kid_std']:.4f}; "
        f"mean and sd over {subsets} subsets of {kid_subset_size(n)} of the n = {n})"
    )
