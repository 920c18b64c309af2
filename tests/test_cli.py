"""train.py and sample.py as a user runs them: multiruns, reproducible sampling, W&B offline, clear errors."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import FAST, ROOT, compose_cfg


def run(script, *args, cwd=ROOT, check=True):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run (with CFG, so sampling can be guided) shared by the sampling tests."""
    from flowdiff.runs import train

    out = tmp_path_factory.mktemp("train")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # in-process: the CLI itself runs in the multirun test below
        train(compose_cfg(["guidance=cfg", *FAST], out))
    assert "val/w2 =" in printed.getvalue() and "checkpoint:" in printed.getvalue()
    return out


def test_train_prints_where_things_are(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and "val/w2" in metrics and "val/w2_floor" in metrics
    assert (trained / "checkpoints" / "last.ckpt").exists()
    assert (trained / "plots" / "samples_last.png").exists()
    assert (trained / "csv" / "metrics.csv").exists()


@pytest.mark.slow  # over 10 s: make test-all
def test_sample_is_reproducible_and_sweepable(trained, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    outs = []
    from flowdiff.evaluation import sample

    for k, seed in enumerate([3, 3, 4]):
        d = tmp_path / f"s{k}"
        args = [f"ckpt={ckpt}", "n=300", f"seed={seed}", "sampler=heun", "sampler.steps=7", "guidance.scale=3"]
        sample(compose_cfg(args, d, config="sample"))  # in-process; sample.py itself runs the sweep below
        outs.append(torch.load(d / "samples.pt"))
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["nfe"] == 14 and metrics["guidance_scale"] == 3
        assert (
            metrics["straightness"] > 0 and metrics["straightness_n"] == 300
        )  # of the model's ODE (test_straightness)
        assert (d / "samples.png").exists()
    # the reported W2 is that of the saved samples against the test set (recomputed here)
    from flowdiff.build import load_checkpoint
    from flowdiff.metrics import w2

    _, dm, _ = load_checkpoint(ckpt)
    m = metrics["w2_n"]
    assert metrics["w2"] == pytest.approx(w2(outs[-1]["x"][:m], dm.test_set["x1"][:m]), rel=1e-9)
    assert torch.equal(outs[0]["x"], outs[1]["x"])
    assert not torch.equal(outs[0]["x"], outs[2]["x"])
    # sample.py as a user runs it, sweeping: its heun job is the same seed as above, so the same samples
    sweep = tmp_path / "sweep"
    swept = [f"ckpt={ckpt}", "n=300", "seed=3", "sampler=heun,rk4", "sampler.steps=7", "guidance.scale=3"]
    run("sample.py", "-m", *swept, f"hydra.sweep.dir={sweep}")
    nfes = sorted(json.loads(p.read_text())["nfe"] for p in sweep.glob("*/metrics.json"))
    assert nfes == [14, 28]
    heun = next(p.parent for p in sweep.glob("*/samples.pt") if "sampler=heun" in p.parent.name)
    assert torch.equal(torch.load(heun / "samples.pt")["x"], outs[0]["x"])


def test_sample_keeps_the_trained_sampler_settings(tmp_path, capsys):
    """Naming the trained sampler changes only what the command sets, not its config file's defaults (issue 8.5).
    In-process: the command line's explicit keys reach sample() through Hydra's recorded overrides."""
    from flowdiff.evaluation import sample
    from flowdiff.runs import train

    out = tmp_path / "train"
    trained_with = ["objective=score", "sampler=euler_maruyama", "sampler.sigma=2.5", "sampler.sigma_schedule=constant"]
    train(compose_cfg([*trained_with, *FAST], out))
    ckpt = out / "checkpoints" / "last.ckpt"
    sample(compose_cfg([f"ckpt={ckpt}", "n=50", "sampler=euler_maruyama", "sampler.steps=5"], tmp_path / "s", "sample"))
    used = torch.load(tmp_path / "s" / "samples.pt")["sampler"]
    assert used["sigma"] == 2.5 and used["sigma_schedule"] == "constant" and used["steps"] == 5
    printed = capsys.readouterr().out
    assert "EulerMaruyamaSampler(steps=5" in printed and "sigma_schedule=constant" in printed


@pytest.mark.slow  # over 10 s: make test-all
def test_wandb_offline_run_holds_the_plot(tmp_path):
    wandb = pytest.importorskip("wandb")
    from flowdiff.runs import train

    try:  # in-process (6 s less than a second interpreter); the CLI's loggers are the same code
        train(compose_cfg(["logger=wandb", *FAST], tmp_path))
    finally:
        wandb.finish()
    images = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))
    assert images, list((tmp_path / "wandb").rglob("*"))[:20]
    # offline, the resolved config lives in the run's record file (uploaded by `wandb sync`)
    record = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"objective" in record and b"flowdiff.paths.CondOTSchedule" in record


def test_invalid_combination_is_one_sentence(tmp_path, capsys):
    """What train.py's task does with one (every invalid combination is checked directly in test_framework.py):
    one line on stderr, exit code 2. In-process; the real CLI's exits are checked in test_reliability.py."""
    from flowdiff.cli.train import main

    with pytest.raises(SystemExit) as stop:
        main(compose_cfg(["data=toy", "data.name=gaussian", "guidance=cfg"], tmp_path))
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("config error: guidance=cfg needs labelled data") and stderr.count("\n") == 1


def test_unreadable_checkpoints_fail_in_one_sentence(trained, tmp_path, capsys):
    """A truncated file, a foreign file and one whose weights do not fit its config: one sentence each."""
    from flowdiff.build import load_checkpoint
    from flowdiff.errors import ConfigError

    good = trained / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ConfigError, match="cannot be read .*truncated or not a checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ConfigError, match="carries no flowdiff config"):
        load_checkpoint(foreign)
    edited = torch.load(good, weights_only=False)
    edited["flowdiff_config"]["net"]["width"] = 8  # the config now builds a narrower net than the weights
    mismatched = tmp_path / "mismatched.ckpt"
    torch.save(edited, mismatched)
    with pytest.raises(ConfigError, match="do not fit the network the config builds") as err:
        load_checkpoint(mismatched)
    assert "\n" not in str(err.value)
    from flowdiff.cli.sample import main

    with pytest.raises(SystemExit) as stop:  # what sample.py does with it: one line on stderr, exit code 2
        main(compose_cfg([f"ckpt={truncated}"], tmp_path / "s", config="sample"))
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"config error: ckpt={truncated} cannot be read") and stderr.count("\n") == 1


def test_sample_refuses_a_solver_setting_out_of_range(trained, tmp_path):
    """sample.py ckpt=... sampler=dopri5 sampler.rtol=-1 was accepted and sampled with: one sentence now."""
    from flowdiff.errors import ConfigError
    from flowdiff.evaluation import sample

    args = [f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", "sampler=dopri5", "sampler.rtol=-1"]
    with pytest.raises(ConfigError, match=r"^sampler.rtol=-1 is out of range: set it to a positive relative tolerance"):
        sample(compose_cfg(args, tmp_path, config="sample"))
    nll = [f"ckpt={trained / 'checkpoints' / 'last.ckpt'}", "nll.n=10", "nll.atol=0"]  # the likelihood's solver too
    with pytest.raises(ConfigError, match=r"^nll.atol=0 is out of range: set it to a positive absolute tolerance"):
        sample(compose_cfg(nll, tmp_path, config="sample"))
    assert not (tmp_path / "samples.pt").exists()
