"""Images: the three on-disk formats, the UNets, guidance on images, training a few steps on each format."""

import json

import numpy as np
import pytest
import torch

from flowdiff.build import build_datamodule, build_run
from flowdiff.data.formats import write_cifar10, write_image_folder
from flowdiff.data.images import ImageDataModule, to_model, to_uint8, to_unit
from flowdiff.errors import ConfigError, DataError
from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.model import FlowModel
from flowdiff.nets import ADMUNet, CourseUNet
from flowdiff.paths import CondOTSchedule, GaussianPath
from flowdiff.runs import train
from helpers import TINY_IMAGES, TINY_UNET, compose_cfg, objective_of, tiny_classifier, tiny_mnist


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    tiny_mnist(root / "mnist")
    write_cifar10(root / "cifar", rng.integers(0, 256, (24, 32, 32, 3)), np.arange(24) % 10)
    write_image_folder(root / "folder", rng.integers(0, 256, (30, 20, 26, 3)), np.arange(30) % 3, ["a", "b", "c"])
    tiny_classifier(root / "clf1.pt", 1)
    tiny_classifier(root / "clf3.pt", 3)
    return root


def test_pixels_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model(u8.float() / 255)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u8)
    assert torch.allclose(to_unit(x), u8.float() / 255)


def test_mnist_idx_files_are_read_with_shape_labels_and_range(files):
    dm = ImageDataModule("mnist", str(files / "mnist"), num_workers=0, batch_size=16, n_val=8)
    assert dm.data_shape == (1, 28, 28) and dm.num_classes == 10 and "test split" in dm.split
    batch = next(iter(dm.train_dataloader()))
    assert batch["x1"].shape == (16, 1, 28, 28) and batch["y"].shape == (16,)
    assert batch["x1"].min() >= -1 and batch["x1"].max() <= 1
    val = list(dm.val_dataloader())
    assert sum(len(b["x1"]) for b in val) == 8
    # resize (lab 3) and padding change the shape the model is told about
    assert ImageDataModule("mnist", str(files / "mnist"), image_size=32).data_shape == (1, 32, 32)
    padded = ImageDataModule("mnist", str(files / "mnist"), pad=2, num_workers=0, batch_size=4)
    x = next(iter(padded.train_dataloader()))["x1"]
    assert x.shape == (4, 1, 32, 32) and (x[:, :, :2] == -1).all()


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    tiny_mnist(tmp_path, n_train=20, n_test=10, folder="FashionMNIST")
    dm = ImageDataModule("fashion_mnist", str(tmp_path), num_workers=0, batch_size=5)
    x, y = dm.real_images(100, "val")
    assert x.shape == (10, 1, 28, 28) and sorted(y.tolist()) == list(range(10))
    with pytest.raises(DataError, match="data=mnist found no dataset"):
        ImageDataModule("mnist", str(tmp_path))  # MNIST's own files are not there


def test_cifar_batches_and_flip(files):
    dm = ImageDataModule("cifar10", str(files / "cifar"), verify_md5=False, num_workers=0, batch_size=24, hflip=True)
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 10
    torch.manual_seed(0)
    x = next(iter(dm.train_dataloader()))["x1"]
    real, y = dm.real_images(10**6, "train")
    assert real.shape == (5 * 24, 3, 32, 32)  # five training batches
    # every training image is either a real one or its mirror image, and some are flipped
    flat, mirrored = real.flatten(1), real.flip(-1).flatten(1)

    def matches(a, b):
        return (torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").min(1).values < 1e-4).sum()

    plain, flipped = matches(x.flatten(1), flat), matches(x.flatten(1), mirrored)
    assert plain + flipped >= 24 and flipped > 0 and plain > 0
    with pytest.raises(Exception, match="checksums"):
        ImageDataModule("cifar10", str(files / "cifar"), num_workers=0).setup()


def test_image_folder_classes_split_and_no_labels(files):
    dm = ImageDataModule("image_folder", str(files / "folder"), image_size=16, val_fraction=0.2, num_workers=0)
    assert dm.data_shape == (3, 16, 16) and dm.num_classes == 3
    dm.setup()
    assert len(dm._train) == 24 and len(dm._val) == 6
    assert not set(dm._train.indices) & set(dm._val.indices)
    unlabelled = ImageDataModule("image_folder", str(files / "folder"), image_size=16, labels=False, num_workers=0)
    assert unlabelled.num_classes == 0 and "y" not in next(iter(unlabelled.train_dataloader()))


def test_missing_files_are_one_sentence_naming_them(tmp_path):
    cfg = compose_cfg(["data=mnist", f"data.root={tmp_path}"], tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        build_datamodule(cfg)
    msg = str(err.value)
    assert "MNIST/raw/train-images-idx3-ubyte" in msg and "data.download=true" in msg and "\n" not in msg


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("labels", [0, 10])
def test_course_unet_shapes(size, labels):
    net = CourseUNet(data_shape=(1, size, size), num_classes=labels).eval()
    x, t = torch.randn(3, 1, size, size), torch.rand(3)
    y = torch.tensor([0, 9, 10]) if labels else None
    assert net(x, t, y).shape == x.shape
    if labels:  # y=None means the null label
        assert torch.equal(net(x, t, None), net(x, t, torch.full((3,), 10)))


@pytest.mark.parametrize("size", [28, 32])
def test_adm_unet_shapes_and_channels_last(size):
    net = ADMUNet(
        data_shape=(3, size, size),
        channels=32,
        channel_mult=(1, 2),
        attention_resolutions=(size // 2,),
        head_channels=16,
        num_classes=10,
    ).eval()
    for p in net.parameters():  # leave the zero-initialised layers non-zero so the comparison means something
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(2, 3, size, size), torch.rand(2), torch.tensor([3, 10])
    out = net(x, t, y)
    assert out.shape == x.shape
    net_cl = net.to(memory_format=torch.channels_last)
    out_cl = net_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out_cl, out, atol=1e-4, rtol=1e-4)


def test_adm_unet_is_torchcfms_cifar_configuration():
    n = sum(p.numel() for p in ADMUNet().parameters())
    assert n == 35_746_307  # torchcfm 1.0.7 UNetModelWrapper(dim=(3, 32, 32), 128, 2, [1, 2, 2, 2], heads of 64)


def test_nets_refuse_the_wrong_data(tmp_path, files):
    cfg = compose_cfg(["data=mnist", f"data.root={files / 'mnist'}", "net=mlp"], tmp_path)
    with pytest.raises(ConfigError, match="net=mlp is for vectors"):
        build_run(cfg)
    cfg = compose_cfg(["data=moons", "net=unet"], tmp_path)
    with pytest.raises(ConfigError, match="net=unet is for images"):
        build_run(cfg)


def test_guidance_on_a_unet_at_w1_and_w0():
    torch.manual_seed(0)
    net = CourseUNet(
        data_shape=(1, 16, 16), channels=(8, 16), num_residual_layers=1, t_embed_dim=8, y_embed_dim=8, num_classes=10
    )
    module = FlowModel(
        net,
        GaussianPath(CondOTSchedule()),
        objective_of("cfm"),
        (1, 16, 16),
        guidance=ClassifierFreeGuidance(null_label=10),
    ).eval()
    x, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, None)
        torch.testing.assert_close(module.prediction(x, t, y, guidance_scale=1.0), cond)
        torch.testing.assert_close(module.prediction(x, t, y, guidance_scale=0.0), uncond)
        torch.testing.assert_close(
            module.prediction(x, t, y, guidance_scale=3.0), uncond + 3 * (cond - uncond), atol=1e-5, rtol=1e-5
        )


def test_label_dropout_happens_in_training():
    """With p_uncond = 0.5, about half the labels the network sees in a training loss are the null label."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            seen.append(y.clone())
            return x * self.w

    module = FlowModel(
        Spy(),
        GaussianPath(CondOTSchedule()),
        objective_of("cfm"),
        (1, 4, 4),
        guidance=ClassifierFreeGuidance(null_label=10, p_uncond=0.5),
    )
    module.train()
    module.loss({"x1": torch.randn(2000, 1, 4, 4), "y": torch.randint(0, 10, (2000,))})
    share = (seen[-1] == 10).float().mean()
    assert 0.45 < share < 0.55
    module.eval()
    module.loss({"x1": torch.randn(100, 1, 4, 4), "y": torch.randint(0, 10, (100,))})
    assert (seen[-1] != 10).all()  # no dropout outside training


@pytest.mark.parametrize("data", ["mnist", "cifar10", "image_folder"])
def test_train_a_few_steps_on_each_format(data, files, tmp_path):
    root = {"mnist": files / "mnist", "cifar10": files / "cifar", "image_folder": files / "folder"}[data]
    extra = {
        "mnist": [
            "guidance=cfg",
            f"callbacks.image_metrics.classifier_path={files / 'clf1.pt'}",
            "logger=many",
            "callbacks.image_metrics.nfe=[1,2]",
        ],
        "cifar10": ["data.verify_md5=false", "callbacks.image_metrics=null"],
        "image_folder": [
            "data.image_size=16",
            "data.val_fraction=0.4",  # 12 held-out images: the floor's n = 12 of them
            "callbacks.image_metrics.n=12",
            "guidance=cfg",
            "callbacks.image_metrics.features=classifier",
            f"callbacks.image_metrics.classifier_path={files / 'clf3.pt'}",
        ],
    }[data]
    cfg = compose_cfg([f"data={data}", f"data.root={root}", *TINY_UNET, *TINY_IMAGES, *extra], tmp_path)
    metrics = train(cfg)
    assert metrics["global_step"] == 3 and np.isfinite(metrics["val/loss"])
    grids = sorted(p.name for p in (tmp_path / "grids").glob("last*.png"))
    assert grids == (["last.png"] if data == "cifar10" else ["last_w1.png", "last_w3.png"])
    if data != "cifar10":
        assert "val/fid" in metrics and "val/fid_floor" in metrics and "val/class_acc" in metrics
        assert metrics["val/fid"] > 0 and 0 <= metrics["val/class_acc"] <= 1
    if data == "mnist":  # quality against NFE at the end of the run: other samples, other scores
        assert metrics["val/fid_nfe1"] > 0 and metrics["val/fid_nfe1"] != metrics["val/fid_nfe2"]
        assert 0 <= metrics["val/class_acc_nfe1"] <= 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["global_step"] == 3
    if data == "mnist":  # the grids reach TensorBoard as images, one tag per guidance scale
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        assert {"samples_w1", "samples_w3"} <= set(events.Tags()["images"])


def test_stages_on_images_distill_and_consistency_from_a_cfg_teacher(files, tmp_path):
    """A class-conditional image teacher, its 2-step distilled student and its consistency model: each trains, is
    scored by the classifier (FID, class accuracy) with the student's own sampler at w = 1, and samples alone."""
    from flowdiff.build import load_checkpoint

    tiny = [o for o in TINY_IMAGES if not o.startswith("sampler.steps")]  # a stage sets its sampler's steps
    base = ["data=mnist", f"data.root={files / 'mnist'}", *TINY_UNET, *tiny, "guidance=cfg", "callbacks.grid=null"]
    base += [f"callbacks.image_metrics.classifier_path={files / 'clf1.pt'}", f"log_root={tmp_path}"]
    train(compose_cfg([*base, "sampler.steps=2", "callbacks.image_metrics=null"], tmp_path / "teacher"))
    teacher = f"teacher={tmp_path / 'teacher' / 'checkpoints' / 'last.ckpt'}"
    stages = {
        "distill": ["stage=distill", "stage.steps=2", "stage.n_pairs=24", "stage.batch_size=8"],
        "consistency": ["stage=consistency"],
    }
    stages["distill"] += ["sampler@stage.sampler=euler", "stage.sampler.steps=4"]
    for name, extra in stages.items():
        metrics = train(compose_cfg([*base, *extra, teacher], tmp_path / name))
        assert metrics["nfe"] == (2 if name == "distill" else 1)
        assert metrics["val/fid"] > 0 and 0 <= metrics["val/class_acc"] <= 1
        student, _, cfg = load_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
        assert cfg.guidance.scale == 1.0 and student.guidance.scale == 1.0  # the teacher's w is in what it learned
        x = student.sample(4, y=torch.arange(4)).x
        assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all()


def test_classifier_cache_key_follows_what_the_classifier_reads(files, tmp_path):
    """``image_size=32`` and ``image_size=null pad=2`` both give 32 x 32 digits, but not the same digits: each has its
    own cached classifier (today's main keyed both by name, root and shape: one file); so do other files."""
    from flowdiff.metrics.classifier import cache_path

    resized = ImageDataModule("mnist", str(files / "mnist"), image_size=32, num_workers=0)
    padded = ImageDataModule("mnist", str(files / "mnist"), pad=2, num_workers=0)
    assert resized.data_shape == padded.data_shape == (1, 32, 32)
    assert cache_path(resized) != cache_path(padded)
    assert cache_path(resized) == cache_path(ImageDataModule("mnist", str(files / "mnist"), image_size=32))
    other = tiny_mnist(tmp_path / "other", n_train=70)  # the same layout, other files
    assert cache_path(ImageDataModule("mnist", str(other), image_size=32)) != cache_path(resized)


def _colour_folder(root, classes):
    rng = np.random.default_rng(2)
    labels = np.arange(40) % len(classes)
    images = rng.integers(0, 60, (40, 16, 16, 3))
    for k, c in enumerate(labels):  # each class a bright stripe of its own colour
        images[k, 6:10, :, c % 3] = 255
    write_image_folder(root, images, labels, classes)
    return root


def test_features_auto_never_stops_a_run_that_did_not_ask_for_them(tmp_path, monkeypatch, capsys):
    """A labelled colour image folder and no Inception weights: features=auto trains the data's own classifier
    (three channels, cached) and reports FID with it; an unlabelled folder (one class) trains with FID off and one
    line saying how to turn it on. Today's main refused both at start-up ('FID with Inception features needs
    torch-fidelity's weights file'). features=inception without the file still refuses."""
    import flowdiff.metrics.classifier as classifier

    monkeypatch.setattr(classifier, "CACHE", tmp_path / "cache")
    common = [*TINY_UNET, *TINY_IMAGES, "data=image_folder", "data.image_size=16", "data.val_fraction=0.5"]
    common += ["callbacks.grid=null", "callbacks.image_metrics.n=16"]
    labelled = _colour_folder(tmp_path / "labelled", ["red", "green", "blue"])
    metrics = train(compose_cfg([*common, f"data.root={labelled}", "guidance=cfg"], tmp_path / "a"))
    printed = capsys.readouterr().out
    assert metrics["val/fid"] > 0 and 0 <= metrics["val/class_acc"] <= 1
    assert "features: image_folder classifier" in printed and "training the image_folder classifier once" in printed
    (cached,) = (tmp_path / "cache").glob("*.pt")
    stored = torch.load(cached, weights_only=False)
    assert (stored["in_channels"], stored["num_classes"]) == (3, 3)  # the data's own: colour, three classes
    unlabelled = _colour_folder(tmp_path / "unlabelled", ["all"])
    metrics = train(compose_cfg([*common, f"data.root={unlabelled}", "data.labels=false"], tmp_path / "b"))
    printed = capsys.readouterr().out
    assert "val/fid" not in metrics and metrics["global_step"] == 3
    assert "no FID for data=image_folder" in printed and "inception_weights=PATH" in printed
    cfg = compose_cfg([*common, f"data.root={labelled}", "callbacks.image_metrics.features=inception"], tmp_path / "c")
    with pytest.raises(ConfigError, match="FID with Inception features needs torch-fidelity's weights file"):
        train(cfg)
