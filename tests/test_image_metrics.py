"""FID / KID through the same code path as training: closed forms, the Inception file, the digit classifier."""

import math

import pytest
import torch

from flowdiff.data.images import ImageDataModule
from flowdiff.metrics.classifier import DigitClassifier, load_classifier, save_classifier, train_classifier
from flowdiff.metrics.images import (
    INCEPTION_FILE,
    ClassifierFeatures,
    FeatureExtractor,
    FeatureFID,
    InceptionFeatures,
    MissingWeights,
    fid_between,
    fid_report,
)
from helpers import ROOT

MNIST_5K = ROOT.parent / "shared" / "data" / "mnist-5k"


class FirstPixels(FeatureExtractor):
    """The first ``d`` numbers of each image: FID in this space is FID of those numbers."""

    name = "first pixels"

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.flatten(1)[:, : self.num_features]


def test_fid_of_a_set_with_itself_is_zero():
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(2, 1000, 1, 2, 4, generator=g)
    assert abs(fid_between(FirstPixels(6), x, x, kid_subsets=5)["fid"]) < 1e-6
    # KID is unbiased: about 0 for two draws of one law, far from it for a shifted law
    same = fid_between(FirstPixels(6), x, x2, kid_subsets=20)["kid"]
    shifted = fid_between(FirstPixels(6), x, x2 + 0.5, kid_subsets=20)["kid"]
    assert abs(same) < 0.05 * shifted


def test_fid_of_two_gaussians_is_the_closed_form():
    """N(m1, diag s1^2) vs N(m2, diag s2^2): FID = |m1 - m2|^2 + sum (s1 - s2)^2."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 20000
    m1, m2 = torch.tensor([0.0, 1.0, -1.0, 0.5]), torch.tensor([0.5, 1.0, 0.0, 0.5])
    s1, s2 = torch.tensor([1.0, 0.5, 2.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 0.3])
    a = (m1 + s1 * torch.randn(n, d, generator=g, dtype=torch.float64)).view(n, 1, 1, d)
    b = (m2 + s2 * torch.randn(n, d, generator=g, dtype=torch.float64)).view(n, 1, 1, d)
    exact = float((m1 - m2).pow(2).sum() + (s1 - s2).pow(2).sum())  # 1.25 + 1.74 = 2.99
    assert fid_between(FirstPixels(d), a, b, kid_subsets=2)["fid"] == pytest.approx(exact, rel=0.03)


def test_fake_images_are_forgotten_and_real_features_kept():
    metric = FeatureFID(FirstPixels(3), kid_subsets=2)
    real = torch.randn(300, 1, 1, 3)
    metric.update(real, real=True)
    metric.update(real + 1, real=False)
    assert metric.compute()["fid"] == pytest.approx(3.0, abs=1e-6)
    metric.reset_fake()
    metric.update(real, real=False)
    assert metric.compute()["fid"] == pytest.approx(0.0, abs=1e-6)


def test_inception_from_a_local_weights_file_runs_end_to_end(tmp_path):
    """torch-fidelity's InceptionV3 built from a weights file on disk (random weights saved here): no download."""
    path = tmp_path / INCEPTION_FILE
    weights = _random_inception_state(tmp_path)
    torch.save(weights, path)
    extractor = InceptionFeatures(path)
    assert extractor.num_features == 2048 and INCEPTION_FILE in extractor.name
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1  # one channel: repeated to RGB
    colour = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    feats = extractor(gray)
    assert feats.shape == (6, 2048) and torch.isfinite(feats).all()
    scores = fid_between(extractor, colour, gray, kid_subsets=2)  # one 2048 x 2048 FID: seconds on the CPU
    assert math.isfinite(scores["fid"]) and scores["fid"] > 0


def _random_inception_state(tmp_path):
    """The state dict of torch-fidelity's InceptionV3 with its random initial weights."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    original = fe.load_state_dict_from_url

    def fake_download(*args, **kwargs):
        raise RuntimeError("no download")

    net = fe.FeatureExtractorInceptionV3.__new__(fe.FeatureExtractorInceptionV3)
    try:
        fe.load_state_dict_from_url = fake_download
        # build the layers without loading: torch.load of a file holding this very structure's random state
        holder = tmp_path / "structure.pt"
        torch.save({}, holder)
        try:
            fe.FeatureExtractorInceptionV3.__init__(
                net, "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(holder)
            )
        except RuntimeError:  # load_state_dict({}) fails after every layer exists: that is all we need
            pass
    finally:
        fe.load_state_dict_from_url = original
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_missing_inception_weights_say_what_to_fetch(tmp_path):
    with pytest.raises(MissingWeights) as err:
        InceptionFeatures(tmp_path / "nope.pth")
    msg = str(err.value)
    assert INCEPTION_FILE in msg and "inception_weights=PATH" in msg and "https://" in msg


def test_classifier_round_trip_and_report(tmp_path):
    model = DigitClassifier(1, 10)
    model.accuracy = 0.5
    save_classifier(model, tmp_path / "c.pt")
    loaded = load_classifier(tmp_path / "c.pt")
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    assert loaded.accuracy == 0.5 and ClassifierFeatures(loaded)(x).shape == (5, 128)
    line = fid_report(12.345, 1.5, 1000, "mnist classifier")
    assert line == "FID 12.35 (real-vs-real floor 1.50; n = 1000; features: mnist classifier)"


@pytest.mark.slow
@pytest.mark.skipif(not MNIST_5K.exists(), reason="needs ../shared/data/mnist-5k")
def test_digit_classifier_reaches_97_percent_on_real_test_digits():
    dm = ImageDataModule("mnist", str(MNIST_5K), num_workers=0)
    model = train_classifier(dm.real_images(10**9, "train"), dm.real_images(10**9, "val"), verbose=False)
    assert model.accuracy >= 0.97
    assert not math.isnan(model.accuracy)
