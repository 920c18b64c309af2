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
    kid_subset_size,
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


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved as the weights file flowdiff reads (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    class Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initial weights
            return None

    folder = tmp_path_factory.mktemp("inception")
    torch.save({}, folder / "empty.pt")
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(folder / "empty.pt"))
    path = folder / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_from_a_local_weights_file_runs_end_to_end(inception_file):
    extractor = InceptionFeatures(inception_file)
    assert extractor.num_features == 2048 and INCEPTION_FILE in extractor.name
    g = torch.Generator().manual_seed(0)
    gray = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1  # one channel: repeated to RGB
    colour = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    feats = extractor(gray)
    assert feats.shape == (6, 2048) and torch.isfinite(feats).all()
    scores = fid_between(extractor, colour, gray, kid_subsets=2)  # one 2048 x 2048 FID: seconds on the CPU
    assert math.isfinite(scores["fid"]) and scores["fid"] > 0


def test_inception_features_are_torch_fidelitys(inception_file):
    """The same weights file in flowdiff's extractor and in torch_fidelity.FeatureExtractorInceptionV3 (fed the uint8
    images, gray ones as RGB, as torch-fidelity's loader gives them): the tensor fed to the first convolution (after
    the resize to 299 and the scaling; random weights make the features themselves insensitive to the image) and
    the features agree to 1e-5, for gray and colour images of 28, 32 and 64 pixels. Today's main fed torchmetrics'
    antialiased resize instead of torch-fidelity's TF1 bilinear one: 91% apart in relative L2 at 32 pixels."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours = InceptionFeatures(inception_file)
    theirs = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file)
    )
    fed = {}

    def keep(name):
        def hook(module, args):
            fed[name] = args[0].detach().clone()

        return hook

    first = [m for m in ours.modules() if type(m).__name__ == "BasicConv2d"][0]
    first.register_forward_pre_hook(keep("ours"))
    theirs.Conv2d_1a_3x3.register_forward_pre_hook(keep("theirs"))
    g = torch.Generator().manual_seed(1)
    for channels in (1, 3):
        for size in (28, 32, 64):
            pixels = torch.randint(0, 256, (2, channels, size, size), generator=g, dtype=torch.uint8)
            x = pixels.float() / 255 * 2 - 1  # flowdiff's model space
            with torch.no_grad():
                mine = ours(x)
                reference = theirs(pixels.expand(-1, 3, -1, -1))[0]
            assert fed["ours"].shape == (2, 3, 299, 299)
            torch.testing.assert_close(fed["ours"], fed["theirs"], atol=1e-5, rtol=0)
            torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)


def test_kid_spread_is_its_standard_error():
    """KID's subsets hold half of the n images, so they differ and ``kid_std`` is a spread: within 25% of the spread of
    KID over independent sets of n images (1.0-1.07x for three seeds), i.e. KID's standard error at n. Today's main
    drew subsets of all n images (the same set in another order) and printed kid_std 0.0."""
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(0)
    n, d = 400, 6

    def pair(k):
        return torch.randn(k, 1, 1, d, generator=g, dtype=torch.float64), torch.randn(
            k, 1, 1, d, generator=g, dtype=torch.float64
        ) * 1.2 + 0.3

    scores = fid_between(FirstPixels(d), *pair(n), kid_subsets=100)
    assert kid_subset_size(n) == n // 2
    independent = torch.stack([poly_mmd(*(a.flatten(1) for a in pair(n))) for _ in range(200)])
    assert 0.75 < scores["kid_std"] / float(independent.std()) < 1.25
    assert scores["kid"] == pytest.approx(float(independent.mean()), abs=3 * float(independent.std()))


def test_kid_leaves_every_random_stream_alone(monkeypatch):
    """KID's subsets are drawn from a fixed seed in a fork of the CPU generator: the stream training draws from goes on
    as if nothing had happened, and no CUDA generator is reseeded (torch.manual_seed would reseed them all: on a GPU
    every DDP rank would then train on the same noise)."""
    import torch.cuda

    def no(*args):
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", no)
    monkeypatch.setattr(torch.cuda, "manual_seed", no)
    metric = FeatureFID(FirstPixels(3), kid_subsets=5, seed=3)
    metric.update(torch.randn(40, 1, 1, 3), real=True)
    metric.update(torch.randn(40, 1, 1, 3), real=False)
    state = torch.get_rng_state()
    first = metric.compute()
    assert torch.equal(torch.get_rng_state(), state) and metric.compute() == first


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
