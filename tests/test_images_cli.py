"""train.py and sample.py on images as a user runs them: grids, classifier FID beside its floor, a sweep table,
bits/dim; and the likelihood of a trained 2D model against the toy's exact density."""

import csv
import json

import pytest
import torch

from flowdiff.errors import ConfigError
from helpers import TINY_IMAGES, TINY_UNET, compose_cfg, tiny_classifier, tiny_mnist
from test_cli import run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("img")
    tiny_mnist(root / "data", n_train=80, n_test=40)
    clf = tiny_classifier(root / "clf.pt")
    out = root / "run"
    proc = run(
        "train.py",
        "data=mnist",
        f"data.root={root / 'data'}",
        "guidance=cfg",
        *TINY_UNET,
        *TINY_IMAGES,
        f"callbacks.image_metrics.classifier_path={clf}",
        f"hydra.run.dir={out}",
    )
    return root, out, clf, proc.stdout


def test_train_reports_fid_with_floor_and_extractor_and_grids(image_run):
    _, out, _, stdout = image_run
    assert "val/FID " in stdout and "real-vs-real floor" in stdout and "features: mnist classifier" in stdout
    assert "val/class_acc" in stdout and "grid: " in stdout
    assert (out / "grids" / "last_w3.png").exists() and (out / "checkpoints" / "last.ckpt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val/fid_floor"] > 0 and metrics["global_step"] == 3


@pytest.mark.slow  # 19 s: make test-all (sample.py's image FID stays in the fast suite, below)
def test_sample_images_fid_sweep_table_and_bits_per_dim(image_run, tmp_path, capsys):
    from flowdiff.evaluation import sample

    root, out, clf, _ = image_run
    ckpt = out / "checkpoints" / "last.ckpt"
    single = tmp_path / "one"
    args = [f"ckpt={ckpt}", "n=30", "sampler.steps=2", "guidance.scale=3", f"metrics.classifier_path={clf}"]
    args += ["metrics.kid_subsets=3", "nll.n=4", "nll.rtol=1e-3", "nll.atol=1e-3", "nll.probes=1"]
    sample(compose_cfg(args, single, config="sample"))  # in-process; sample.py itself runs the sweep below
    printed = capsys.readouterr().out
    assert "FID " in printed and "floor" in printed and "bits/dim" in printed
    m = json.loads((single / "metrics.json").read_text())
    assert m["nfe"] == 2 and m["guidance_scale"] == 3 and 0 <= m["class_acc"] <= 1
    assert m["fid"] > 0 and m["fid_floor"] > 0 and m["fid_n"] == 30
    assert 0 < m["bits_per_dim"] < 20 and m["dequantisation"].startswith("uniform")
    samples = torch.load(single / "samples.pt")
    assert samples["x"].dtype == torch.uint8 and samples["x"].shape == (30, 1, 28, 28)
    assert (single / "samples.png").exists()
    sweep = tmp_path / "sweep"
    run(
        "sample.py",
        "-m",
        f"ckpt={ckpt}",
        "n=20",
        "guidance.scale=1,3",
        "sampler.steps=1",
        f"metrics.classifier_path={clf}",
        "metrics.kid_subsets=2",
        f"hydra.sweep.dir={sweep}",
    )
    rows = list(csv.DictReader((sweep / "metrics.csv").open()))
    assert len(rows) == 2
    pairs = sorted((float(r["guidance_scale"]), int(r["nfe"])) for r in rows)
    assert pairs == [(1.0, 1), (3.0, 1)]
    assert all(float(r["fid"]) > 0 for r in rows)


def test_sample_fid_and_its_floor_share_one_n(image_run, tmp_path, capsys):
    """FID compares the n samples with n training images and its floor n training with n held-out ones, the printed
    n that one; an n above the 40 held-out images is refused in one sentence before sampling. Long steps show
    progress (here, in a log: a line when each starts and ends) and say what they evaluate. Today's main compared
    50 samples with 50 training images but its floor with 40 held-out ones."""
    from flowdiff.evaluation import sample

    _, out, clf, _ = image_run
    args = [f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "sampler.steps=1", f"metrics.classifier_path={clf}"]
    with pytest.raises(ConfigError, match=r"n=50 is larger than data=mnist allows for FID: .* 40 held-out .* n<=40"):
        sample(compose_cfg([*args, "n=50"], tmp_path / "big", config="sample"))
    assert not (tmp_path / "big" / "samples.pt").exists()
    m = sample(compose_cfg([*args, "n=40", "metrics.kid_subsets=4"], tmp_path / "ok", config="sample"))
    printed = capsys.readouterr().out
    assert m["fid_n"] == 40 and m["kid_subset_size"] == 20 and "n = 40;" in printed
    assert "FID/KID of 40 samples against 40 training images, floor 40 training vs 40 held-out" in printed
    assert "sampling 40 images (EulerSampler(steps=1" in printed and "w = " in printed
    assert "FID/KID features: 120/120 in" in printed


@pytest.mark.slow
def test_nll_of_a_trained_2d_model_matches_the_exact_density(tmp_path):
    """gmm (lab 2's mixture, here std 1, radius 4): the flow's NLL within 0.1 nats of the exact density's."""
    out = tmp_path / "run"
    run(
        "train.py",
        "data=gmm",
        "data.params.scale=4.0",
        "trainer.max_steps=3000",
        "data.steps_per_epoch=3000",
        "net.width=128",
        "net.time_dim=32",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out}",
    )
    proc = run(
        "sample.py",
        f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
        "n=500",
        "nll.n=1000",
        f"hydra.run.dir={tmp_path / 's'}",
    )
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["nll_divergence"] == "exact" and "NLL:" in proc.stdout
    assert abs(m["nll"] - m["nll_exact"]) < 0.1, m
