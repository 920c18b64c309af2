"""Interrupted and resumed runs lose nothing: exact resume, atomic checkpoints, signals, kill -9, finished runs kept."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowdiff.checkpointing import AtomicCheckpointIO, latest_run_checkpoint, resume_path
from flowdiff.errors import ConfigError
from flowdiff.runs import fit, train
from helpers import FAST, ROOT, compose_cfg

RESUMABLE = [
    *FAST,
    "data=moons",
    "coupling=ot",  # the coupling's draws
    "guidance=cfg",  # label dropout's draws
    "callbacks.plot=null",
    "+scheduler._target_=torch.optim.lr_scheduler.StepLR",
    "+scheduler._partial_=true",
    "+scheduler.step_size=3",
]


def _state(module, trainer, callbacks):
    ema = next(c for c in callbacks if type(c).__name__ == "EMA")
    opt = trainer.optimizers[0].state_dict()["state"]
    return {
        "weights": {k: v.clone() for k, v in module.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema._average_model.module.state_dict().items()},
        "adam": {(i, k): v.clone() for i, s in opt.items() for k, v in s.items()},
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "rng": torch.get_rng_state(),
    }


def test_resume_is_bit_for_bit(tmp_path):
    """8 steps straight equal 5 steps, a stop, and 3 more from the checkpoint, bit for bit: weights, EMA, Adam's
    moments, the LR schedule and the RNG stream (noise, times, OT coupling, label dropout) and the data stream.
    5 is mid-epoch (3 batches per epoch), the case Lightning calls unreliable for a loader without state. Both
    checkpoints a run can be resumed from: the end-of-run one (after its validation) and the periodic one written
    in the middle of a run (what kill -9 leaves)."""
    straight = fit(compose_cfg([*RESUMABLE, "trainer.max_steps=8"], tmp_path / "a"))
    a = _state(straight[0], straight[2], straight[3])
    ended = fit(compose_cfg([*RESUMABLE, "trainer.max_steps=5"], tmp_path / "b"))[2].checkpoint_callback.last_model_path
    periodic = ["callbacks.checkpoint=null", "callbacks.last_checkpoint.every_n_train_steps=5", "trainer.max_steps=7"]
    fit(compose_cfg([*RESUMABLE, *periodic], tmp_path / "d"))
    midway = tmp_path / "d" / "checkpoints" / "last.ckpt"
    for name, last in (("end of run", ended), ("periodic", midway)):
        assert torch.load(last, weights_only=False)["global_step"] == 5, name
        resumed = fit(compose_cfg([*RESUMABLE, "trainer.max_steps=8", f"ckpt_path={last}"], tmp_path / name))
        b = _state(resumed[0], resumed[2], resumed[3])
        assert resumed[2].global_step == straight[2].global_step == 8
        assert resumed[1].batches_trained == straight[1].batches_trained == 8
        for part in ("weights", "ema", "adam"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (name, part, k)
        assert a["lr"] == b["lr"] and torch.equal(a["rng"], b["rng"]), name
    # and the stop mattered: the weights after 5 steps differ from those after 8
    early = torch.load(ended, weights_only=False)["state_dict"]
    assert any(not torch.equal(early[k], a["weights"][k]) for k in early)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while saving leaves the previous last.ckpt whole, and no temporary file behind."""
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 10, "w": torch.arange(1000.0)}, target)

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # what a kill delivers to Python: not an Exception

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 20, "w": torch.zeros(1000)}, target)
    monkeypatch.undo()
    kept = torch.load(target, weights_only=False)
    assert kept["global_step"] == 10 and torch.equal(kept["w"], torch.arange(1000.0))
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_finished_run_dir_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    metrics = train(compose_cfg(FAST, run_dir))
    before = (run_dir / "metrics.json").read_text()
    assert json.loads(before)["global_step"] == metrics["global_step"] == 6
    with pytest.raises(ConfigError, match=r"holds a finished run \(metrics.json\).*choose another hydra.run.dir"):
        train(compose_cfg([*FAST, "seed=7"], run_dir))
    assert (run_dir / "metrics.json").read_text() == before


def test_bad_resume_checkpoints_are_one_sentence(tmp_path):
    good_dir = tmp_path / "good"
    train(compose_cfg(FAST, good_dir))
    good = good_dir / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:3000])
    cases = {
        str(tmp_path / "nowhere.ckpt"): r"ckpt_path=.*nowhere.ckpt does not exist",
        str(truncated): r"ckpt_path=.*truncated.ckpt cannot be read \(.*\): it is truncated or not a checkpoint",
        # a checkpoint of another network: the default 64 wide, resumed with a net 32 wide
        str(good): r"ckpt_path=.*: its weights do not fit the network the config builds "
        r"\(net\.body\.0\.weight is \(64, 3\) there but \(32, 3\) here\)",
    }
    for i, (path, message) in enumerate(cases.items()):
        extra = ["net.width=32"] if path == str(good) else []
        with pytest.raises(ConfigError, match=message) as err:
            fit(compose_cfg([*FAST, *extra, f"ckpt_path={path}"], tmp_path / f"r{i}"))
        assert "\n" not in str(err.value)


def test_ckpt_path_last_finds_the_latest_run_with_the_same_overrides(tmp_path):
    def fake_run(name: str, overrides: list[str], age: float) -> Path:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run / "checkpoints").mkdir()
        last = run / "checkpoints" / "last.ckpt"
        last.write_bytes(b"x")
        os.utime(last, (time.time() - age, time.time() - age))
        return last

    old = fake_run("runs/old", ["objective=score", "trainer.max_steps=100"], age=100)
    new = fake_run("multiruns/2026/objective=score", ["objective=score", "trainer.max_steps=200"], age=10)
    fake_run("runs/other", ["objective=noise"], age=1)  # newer, but another config
    found = latest_run_checkpoint(tmp_path, ["objective=score", "ckpt_path=last", "trainer.max_steps=500"])
    assert found == new
    os.utime(old, None)  # now the old run's checkpoint is the newest
    assert latest_run_checkpoint(tmp_path, ["objective=score"]) == old
    assert latest_run_checkpoint(tmp_path, ["objective=data"]) is None
    cfg = compose_cfg([*FAST, "ckpt_path=last", f"log_root={tmp_path}", "objective=data"], tmp_path / "fresh")
    with pytest.raises(ConfigError, match="ckpt_path=last found no run of this config with checkpoints/last.ckpt"):
        resume_path(cfg)


# ---------------------------------------------------------------- real processes, real signals
LONG = [
    "data=moons",
    "trainer.max_steps=100000",
    "data.steps_per_epoch=100000",  # no validation: the run only stops when told to
    "data.batch_size=64",
    "callbacks.last_checkpoint.every_n_train_steps=25",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.metrics.n=128",
    "callbacks.plot=null",
]


def _start(
    tmp_path: Path, name: str, *args: str, env: dict | None = None, base: list[str] = LONG
) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / name
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", **(env or {})}
    if any(a.startswith("callbacks.on_signal.requeue") for a in args):
        env.update(PATH=env.pop("FLOWDIFF_TEST_PATH"), SLURM_JOB_ID="4242")
    cmd = [sys.executable, "train.py", *base, f"hydra.run.dir={run_dir}", f"log_root={tmp_path}", *args]
    # as a command in a terminal: SIGINT not ignored (a background job of a shell script ignores it, and so would the
    # process it starts), and a process group of its own, which Ctrl-C reaches whole (see _send)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0
    )
    return proc, run_dir


def _send(proc: subprocess.Popen, signum: int) -> None:
    """Ctrl-C as a terminal sends it, to the whole process group (DataLoader workers included); others to the
    process."""
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


def _wait_for_step(proc: subprocess.Popen, last: Path, step: int, timeout: float = 120) -> int:
    """Poll until ``last`` holds a checkpoint of at least ``step`` steps; returns the step it holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if last.is_file():
            try:
                held = torch.load(last, weights_only=False)["global_step"]
            except Exception:  # replaced under our feet: atomic, so the next read is whole
                held = -1
            if held >= step:
                return held
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


@pytest.mark.parametrize(
    "signum",
    # SIGUSR1 (SLURM's warning before pre-emption) takes SIGTERM's handler; SIGINT has its own test of a second
    # Ctrl-C: `make test-all` runs these (each over 10 s)
    [
        signal.SIGTERM,
        pytest.param(signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(signal.SIGUSR1, marks=pytest.mark.slow),
    ],
)
def test_signal_saves_a_checkpoint_and_the_run_resumes(tmp_path, signum):
    """SIGTERM / Ctrl-C (SIGINT) / SIGUSR1: last.ckpt of the very step, exit 128 + signum, one sentence; then the run
    goes on from it (SIGTERM and Ctrl-C: with ckpt_path=last, as a user would; SIGUSR1: restarted in its own run
    directory, as a requeued SLURM job is). Ctrl-C used to go through Lightning's 'graceful shutdown': exit 1, only
    the last periodic checkpoint, no line saying how to resume."""
    requeue = []
    if signum == signal.SIGUSR1:  # as inside a SLURM job with requeue on: a stand-in scontrol records the call
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
        (bin_dir / "scontrol").chmod(0o755)
        os.environ["FLOWDIFF_TEST_PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        requeue = ["callbacks.on_signal.requeue=true"]
    proc, run_dir = _start(tmp_path, "run", *requeue)
    last = run_dir / "checkpoints" / "last.ckpt"
    _wait_for_step(proc, last, 25)
    _send(proc, signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    name = signal.Signals(signum).name
    assert f"stopped: {name} received: saved step" in err and "Traceback" not in err
    step = int(err.split("saved step ")[1].split()[0])
    assert torch.load(last, weights_only=False)["global_step"] == step >= 25
    assert not (run_dir / "metrics.json").exists()
    if requeue:
        assert "SLURM job 4242 requeued" in err
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]

    # resumed in-process (a second interpreter start is 6 s of CPU the test does not need)
    goal = [*LONG, f"log_root={tmp_path}", f"trainer.max_steps={step + 5}"]  # the same overrides, but longer
    if signum in (signal.SIGTERM, signal.SIGINT):
        resume_dir, cfg = tmp_path / "resumed", compose_cfg([*goal, "ckpt_path=last"], tmp_path / "resumed")
    else:
        resume_dir, cfg = run_dir, compose_cfg(goal, run_dir)
    assert train(cfg)["global_step"] == step + 5
    assert json.loads((resume_dir / "metrics.json").read_text())["global_step"] == step + 5
    # the periodic and the end-of-run checkpoints share one last.ckpt (Lightning would add last-v1.ckpt)
    assert not list((resume_dir / "checkpoints").glob("last-v*.ckpt"))
    assert torch.load(resume_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == step + 5


@pytest.mark.slow  # over 10 s: make test-all
def test_a_second_ctrl_c_while_saving_stops_at_once_and_keeps_the_previous_checkpoint(tmp_path):
    """Ctrl-C, then Ctrl-C again while the checkpoint of the step in progress is being written (a test callback makes
    the write take 20 s), on image data read by two DataLoader workers (which get both signals too, as in a terminal,
    where Ctrl-C reaches the whole process group): the run stops at once (exit 130, one sentence, no traceback from a
    worker), the half-written file never replaces last.ckpt, which still holds the last periodic checkpoint whole,
    and no temporary file is left behind."""
    from helpers import TINY_UNET, tiny_mnist

    tiny_mnist(tmp_path / "data")
    images = ["data=mnist", f"data.root={tmp_path / 'data'}", *TINY_UNET, "data.batch_size=8", "data.num_workers=2"]
    images += ["callbacks.image_metrics=null", "callbacks.grid=null"]  # no validation: it stops when told to
    images += [o for o in LONG if not o.startswith(("data=", "data.batch_size", "callbacks.metrics", "callbacks.plot"))]
    marker = tmp_path / "saving"
    slow = ["+callbacks.slow_save._target_=helpers.SlowSave", f"+callbacks.slow_save.marker={marker}"]
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    proc, run_dir = _start(tmp_path, "run", *slow, env={"PYTHONPATH": path}, base=images)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = _wait_for_step(proc, last, 25)
    _send(proc, signal.SIGINT)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    start = time.time()
    _send(proc, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - start < 15, err[-2000:]
    assert err.count("Ctrl-C: saving the step in progress") == 1  # once: not again from each worker
    assert "stopped: SIGINT again: stopped without saving" in err and "Traceback" not in err
    held = torch.load(last, weights_only=False)["global_step"]
    assert held % 25 == 0 and held >= before  # a periodic checkpoint, whole
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.slow  # over 10 s: make test-all
def test_kill_9_loses_at_most_the_checkpoint_interval(tmp_path):
    """kill -9 (no handler runs): last.ckpt is whole and at most every_n_train_steps behind, and resumes."""
    proc, run_dir = _start(tmp_path, "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    seen = _wait_for_step(proc, last, 75)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    held = torch.load(last, weights_only=False)["global_step"]  # whole: it loads
    assert held % 25 == 0 and held >= seen >= 75
    resumed = compose_cfg(
        [*LONG, f"trainer.max_steps={held + 3}", f"ckpt_path={last}", "callbacks.metrics=null"], tmp_path / "again"
    )
    assert train(resumed)["global_step"] == held + 3


# ---------------------------------------------------------------- values and data, before any training
def _with(overrides: list[str], base: list[str] = FAST) -> list[str]:
    keys = {o.split("=", 1)[0] for o in overrides}
    return [o for o in base if o.split("=", 1)[0] not in keys] + overrides


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_steps=0"], r"trainer.max_steps=0 is out of range: set it to a positive number of training"),
        (["sampler.steps=0"], r"sampler.steps=0 is out of range: set it to at least 1"),
        (["stage=distill", "stage.steps=0"], r"stage.steps=0 is out of range: set it to at least 1 \(the student"),
        (
            ["guidance=cfg", "guidance.p_uncond=1.0"],
            r"guidance.p_uncond=1.0 is out of range: set it to inside \[0, 1\)",
        ),
        (["optimizer.lr=-0.001"], r"optimizer.lr=-0.001 is out of range: set it to a positive learning rate"),
        (["optimizer.lr=fast"], r"optimizer.lr='fast' is not a number: set optimizer.lr to one"),
        (["callbacks.ema.decay=1.5"], r"callbacks.ema.decay=1.5 is out of range: set it to inside \(0, 1\)"),
        (["callbacks.metrics.n=5000"], r"callbacks.metrics.n=5000 is out of range: set it to between 1 and 128, the"),
        (["data.batch_size=0"], r"data.batch_size=0 is out of range: set it to at least 1"),
        (["trainer.gradient_clip_val=-1"], r"trainer.gradient_clip_val=-1 is out of range: set it to a positive norm"),
        (["net=unet"], r"net=unet is for images \(C, H, W\), but the data has shape \(2,\): use net=mlp"),
        # every sampler's settings, checked where the sampler is built (once each), named by their key
        (["sampler=dopri5", "sampler.rtol=-1"], r"sampler.rtol=-1 is out of range: set it to a positive relative"),
        (["sampler=dopri5", "sampler.atol=0"], r"sampler.atol=0 is out of range: set it to a positive absolute"),
        (["sampler=heun", "sampler.steps=0"], r"sampler.steps=0 is out of range: set it to at least 1"),
        (["+sampler.t_min=1.5"], r"sampler.t_min=1.5 is out of range: set it to a time in \[0, 1\)"),
        (["+sampler.t_min=0.5", "+sampler.t_max=0.2"], r"sampler.t_max=0.2 is out of range: set it to a time in \(0.5"),
        (["objective=score", "sampler=ddim", "sampler.eta=1.5"], r"sampler.eta=1.5 is out of range: .*0 <= eta <= 1"),
        (["objective=score", "sampler=euler_maruyama", "sampler.sigma=-2"], r"sampler.sigma=-2 is out of range"),
        (["objective=score", "sampler=euler_maruyama", "sampler.langevin_steps=-1"], r"sampler.langevin_steps=-1"),
        (["objective=score", "sampler=euler_maruyama", "sampler.langevin_step=0"], r"sampler.langevin_step=0 is"),
        (["sampler.steps=abc"], r"sampler.steps='abc' is not a number: set it to at least 1"),
        (["sampler.steps=2.5"], r"sampler.steps=2.5 is not a whole number: set it to at least 1"),
        (["sampler=dopri5", "sampler.rtol=tight"], r"sampler.rtol='tight' is not a number: set it to a positive"),
        (["callbacks.metrics.nfe=[1,0]"], r"callbacks.metrics.nfe holds 0: set it to step counts of at least 1"),
    ],
)
def test_out_of_range_values_are_one_sentence(tmp_path, overrides, message):
    from flowdiff.build import build_callbacks, build_run

    cfg = compose_cfg(_with(overrides), tmp_path)
    with pytest.raises(ConfigError, match=message) as err:  # all before training: what fit builds first
        build_callbacks(cfg, build_run(cfg)[1])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["a file", "read-only", "sweep"])
def test_an_impossible_run_directory_is_one_sentence_before_anything_runs(tmp_path, where):
    """A run directory under a file, under a read-only mount (/proc: even root cannot write there), or a sweep
    directory that cannot be made: one sentence naming the path, the reason and the key, exit 2, no traceback, in about
    a second (before torch loads). It used to be a traceback from inside Hydra's directory creation."""
    (tmp_path / "a-file").write_text("x")
    target = {"a file": tmp_path / "a-file" / "run", "read-only": Path("/proc/flowdiff-test/run")}.get(where)
    args = ["-m", "seed=1,2", f"hydra.sweep.dir={tmp_path / 'a-file' / 'sweep'}"] if where == "sweep" else []
    args += [] if target is None else [f"hydra.run.dir={target}"]
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    key = "hydra.sweep.dir" if where == "sweep" else "hydra.run.dir"
    path = tmp_path / "a-file" / "sweep" if where == "sweep" else target
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    reason = "No such file or directory" if where == "read-only" else "Not a directory"
    assert proc.stderr.strip() == (
        f"config error: cannot create the run directory {path} ({reason}): set {key}=<a writable folder> "
        "(or log_root=<one>, under which runs go by default)"
    )


def test_a_typo_in_a_group_lists_the_options(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, "train.py", "sampler=eulr", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Could not find 'sampler/eulr'" in proc.stderr and "Available options in 'sampler'" in proc.stderr
    assert "euler_maruyama" in proc.stderr and "heun" in proc.stderr


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    from helpers import tiny_classifier, tiny_mnist

    root = tmp_path_factory.mktemp("mnist")
    tiny_mnist(root / "data")
    tiny_classifier(root / "clf3.pt", in_channels=3)
    return root


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["net=mlp"], r"net=mlp is for vectors, but the data has shape \(1, 28, 28\): use net=unet for images"),
        (
            ["callbacks.image_metrics.n=100"],
            r"callbacks.image_metrics.n=100 is out of range: set it between 4 and 32; .* 64 training .* 32 held-out",
        ),
        (
            ["callbacks.image_metrics.classifier_path={root}/clf3.pt"],
            r"classifier_path=.*clf3.pt reads 3-channel images of 10 classes, but data=mnist has 1 channels",
        ),
    ],
)
def test_image_values_that_do_not_fit_the_data_are_one_sentence(tmp_path, mnist, overrides, message):
    from helpers import TINY_IMAGES, TINY_UNET

    net = [] if "net=mlp" in overrides else TINY_UNET
    base = ["data=mnist", f"data.root={mnist / 'data'}", *net, *TINY_IMAGES]
    cfg = compose_cfg(_with([o.format(root=mnist) for o in overrides], base), tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        fit(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists()  # stopped before training


def _corrupt_mnist(raw: Path, how: str) -> tuple[Path, str]:
    """Damage one idx file of a tiny MNIST under ``raw``; the file and what the message must say."""
    import struct

    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    data = images.read_bytes()
    if how == "truncated":
        images.write_bytes(data[:1000])
        return images, r"holds 1000 bytes, but its header promises 64 images, 50192 bytes \(truncated\)"
    if how == "wrong magic":
        images.write_bytes(struct.pack(">I", 2049) + data[4:])
        return images, r"starts with magic number 2049, not 2051 \(an idx file of images\)"
    if how == "wrong dimensions":
        images.write_bytes(struct.pack(">IIII", 2051, 64, 32, 24) + data[16:])
        return images, "holds images of 32 x 24 pixels, not 28 x 28"
    if how == "labels out of range":
        values = bytearray(labels.read_bytes())
        values[8 + 5] = 12
        labels.write_bytes(bytes(values))
        return labels, r"holds label 12 \(item 5\), outside 0..9"
    if how == "empty file":
        labels.write_bytes(b"")
        return labels, r"is empty \(0 bytes\)"
    # labels for another number of images
    labels.write_bytes(struct.pack(">II", 2049, 63) + labels.read_bytes()[8:-1])
    return labels, "holds 63 labels for 64 images"


def _corrupt_cifar(folder: Path, how: str) -> tuple[Path, str]:
    import pickle

    import numpy as np

    batch = folder / "data_batch_2"
    entry = pickle.loads(batch.read_bytes())
    if how == "truncated":
        batch.write_bytes(batch.read_bytes()[:500])
        return batch, r"is not a readable pickle \(.*; truncated\?\)"
    if how == "empty file":
        batch.write_bytes(b"")
        return batch, r"is empty \(0 bytes\)"
    if how == "wrong dimensions":
        entry["data"] = entry["data"][:, :1024]
        batch.write_bytes(pickle.dumps(entry))
        return batch, r"holds data of shape \(24, 1024\) and dtype uint8, not \(n, 3072\) uint8"
    if how == "wrong dtype":
        entry["data"] = entry["data"].astype(np.float32)
        batch.write_bytes(pickle.dumps(entry))
        return batch, r"holds data of shape \(24, 3072\) and dtype float32, not \(n, 3072\) uint8"
    if how == "labels out of range":
        entry["labels"][3] = 10
        batch.write_bytes(pickle.dumps(entry))
        return batch, "holds label 10, outside 0..9"
    batch.write_bytes(pickle.dumps([1, 2, 3]))  # another pickle
    return batch, r"is not a CIFAR-10 batch \(a dict with data and labels; found list\)"


MNIST_DAMAGE = ["truncated", "wrong magic", "wrong dimensions", "labels out of range", "empty file", "label count"]
CIFAR_DAMAGE = ["truncated", "empty file", "wrong dimensions", "wrong dtype", "labels out of range", "not a batch"]


@pytest.mark.parametrize(
    "dataset,how",
    [("mnist", h) for h in MNIST_DAMAGE] + [("fashion_mnist", "truncated")] + [("cifar10", h) for h in CIFAR_DAMAGE],
)
def test_corrupt_dataset_files_are_one_sentence_before_training(tmp_path, dataset, how):
    """Every way a file can be damaged that a test can make, for MNIST's idx files and CIFAR-10's pickles: refused
    when the datamodule is built, in one sentence naming the file, what was expected and what was found, and the
    fix. A truncated idx file used to pass start-up and stop trainer.fit with torchvision's RuntimeError."""
    import numpy as np

    from flowdiff.build import build_datamodule
    from flowdiff.data.formats import write_cifar10
    from helpers import tiny_mnist

    if dataset in ("mnist", "fashion_mnist"):
        folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[dataset]
        root = tiny_mnist(tmp_path / "data", folder=folder)
        path, what = _corrupt_mnist(root / folder / "raw", how)
    else:
        root = tmp_path / "data"
        write_cifar10(root, np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3)), np.arange(24) % 10)
        path, what = _corrupt_cifar(root / "cifar-10-batches-py", how)
    cfg_args = [f"data={dataset}", f"data.root={root}", "data.verify_md5=false", "net=unet"]
    fix = re.escape(": copy it again, or delete it and set data.download=true where there is internet")
    for download in ("false", "true"):  # a download fetches only missing files: it would not mend this one
        cfg = compose_cfg([*cfg_args, f"data.download={download}"], tmp_path / "r")
        with pytest.raises(ConfigError, match=f"^{re.escape(str(path))} {what}{fix}"):
            build_datamodule(cfg)


def test_corrupt_images_in_a_folder_are_left_out_by_name(tmp_path):
    """An image folder is checked image by image when it is scanned (already before this round: this pins the two
    kinds of damage the issue names that the truncated-file test above does not): an empty file and one that is no
    image (wrong magic) are left out with the warning that names them, and a folder of thousands of images trains on
    the good ones."""
    import numpy as np

    from flowdiff.data.formats import write_image_folder
    from flowdiff.data.images import ImageDataModule

    root = tmp_path / "folder"
    write_image_folder(root, np.random.default_rng(0).integers(0, 256, (6, 20, 26, 3)), np.arange(6) % 2, ["a", "b"])
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "magic.png").write_bytes(b"GIF89a" + b"\x00" * 100)
    with pytest.warns(UserWarning, match=r"left out 2 unreadable or truncated images \(e.g. .*empty.png\)"):
        dm = ImageDataModule("image_folder", str(root), image_size=16, num_workers=0)
    assert len(dm.dataset.scan.samples) == 6 and not any("magic" in p for p, _ in dm.dataset.scan.samples)


def test_image_folder_leaves_out_bad_files_with_one_counted_warning(tmp_path):
    import numpy as np
    from PIL import Image

    from flowdiff.data.formats import write_image_folder
    from flowdiff.data.images import ImageDataModule
    from flowdiff.errors import DataError

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    write_image_folder(root, rng.integers(0, 256, (12, 20, 26, 3)), np.arange(12) % 2, ["cats", "dogs"])
    Image.fromarray(rng.integers(0, 256, (40, 33, 3)).astype(np.uint8)).save(root / "cats" / "big.png")  # other size
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / "dogs" / "gray.jpg")  # grayscale
    whole = (root / "dogs" / "00001.png").read_bytes()
    (root / "dogs" / "cut.png").write_bytes(whole[: len(whole) // 2])  # truncated
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "cats" / "Thumbs.db").write_bytes(b"\x00" * 10)
    (root / "empty").mkdir()
    with pytest.warns(UserWarning) as caught:
        dm = ImageDataModule("image_folder", str(root), image_size=16, val_fraction=0.25, num_workers=0, batch_size=4)
    messages = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(messages) == 1
    assert "left out 2 not image files" in messages[0] and "1 unreadable or truncated images" in messages[0]
    assert "cut.png" in messages[0] and "1 empty classes (e.g. empty)" in messages[0]
    assert dm.num_classes == 2 and len(dm.dataset.scan.samples) == 14  # 12 + big.png + gray.jpg
    dm.setup()
    seen = sum(len(b["x1"]) for b in dm.train_dataloader()) + sum(len(b["x1"]) for b in dm.val_dataloader())
    assert seen >= 12  # every batch decodes; mixed sizes and modes all come out (3, 16, 16)
    assert next(iter(dm.train_dataloader()))["x1"].shape == (4, 3, 16, 16)
    empty_only = tmp_path / "nothing"
    (empty_only / "a").mkdir(parents=True)
    (empty_only / "a" / "readme.md").write_text("x")
    with pytest.raises(DataError, match=r"data=image_folder found no readable image under .*nothing/<class name>/"):
        ImageDataModule("image_folder", str(empty_only), image_size=16, num_workers=0)


@pytest.mark.slow  # over 10 s: make test-all
def test_a_failing_job_never_stops_its_siblings(tmp_path):
    """A 2 x 2 multirun (optimizer x seed) whose NoSuchOptimizer jobs raise: they are logged, the AdamW jobs finish,
    each job has its own folder (seeds once shared one, each overwriting the last) with different results per seed,
    and the sweep's summary lists all four, the failed ones with their reason; the command then exits 1 (it exited
    0, so a script running a sweep could not tell)."""
    import csv

    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    args = ["-m", "optimizer._target_=torch.optim.NoSuchOptimizer,torch.optim.AdamW", "seed=1,2"]
    proc = subprocess.run(
        [sys.executable, "train.py", *args, *FAST, "callbacks.plot=null", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    # all four ran; then the exit status tells that two failed, and the last line how many and where to look
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"2 of 4 jobs failed; summary: {tmp_path / 'summary.md'}"
    jobs = {}  # (optimizer, seed) -> folder (the names are too long to hold them: see flowdiff.configs.job_dir)
    for saved in tmp_path.glob("*/.hydra/overrides.yaml"):
        items = dict(o.split("=", 1) for o in saved.read_text().replace("- ", "").split())
        jobs[(items["optimizer._target_"].rsplit(".", 1)[-1], items["seed"])] = saved.parents[1]
    assert sorted(jobs) == [("AdamW", "1"), ("AdamW", "2"), ("NoSuchOptimizer", "1"), ("NoSuchOptimizer", "2")]
    assert len({d for d in jobs.values()}) == 4 and all(len(d.name) <= 240 for d in jobs.values())
    w2 = {seed: json.loads((jobs[("AdamW", seed)] / "metrics.json").read_text())["val/w2"] for seed in ("1", "2")}
    assert w2["1"] != w2["2"]
    assert not (jobs[("NoSuchOptimizer", "1")] / "metrics.json").exists()
    assert "job failed; the multirun goes on" in (jobs[("NoSuchOptimizer", "1")] / "train.log").read_text()
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    status = {(r["optimizer._target_"].rsplit(".", 1)[-1], r["seed"]): r for r in rows}
    assert {k: r["status"] for k, r in status.items()} == {
        ("NoSuchOptimizer", "1"): "failed",
        ("NoSuchOptimizer", "2"): "failed",
        ("AdamW", "1"): "completed",
        ("AdamW", "2"): "completed",
    }
    failed = status[("NoSuchOptimizer", "1")]["reason"]
    assert failed.startswith("InstantiationException: Error locating target 'torch.optim.NoSuchOptimizer'")
    done = status[("AdamW", "1")]
    assert float(done["val/w2"]) > 0 and int(done["nfe"]) == 100 and float(done["seconds"]) > 0
    assert "2 of 4 jobs completed" in (tmp_path / "summary.md").read_text()


def test_gradient_clipping_is_one_config_value(tmp_path):
    """trainer.gradient_clip_val bounds the gradient norm: with plain SGD at lr 0.1 and a clip of 1e-6, six steps
    move the weights by at most 6e-7 (unclipped they move by far more)."""
    import lightning as L

    from flowdiff.build import build_run

    sgd = ["optimizer._target_=torch.optim.SGD", "optimizer.lr=0.1", "optimizer.weight_decay=0", "callbacks.ema=null"]
    sgd += ["callbacks.metrics=null", "callbacks.plot=null"]  # only the weights matter here
    moved = {}
    for clip in ("1e-6", "null"):
        cfg = compose_cfg([*FAST, *sgd, f"trainer.gradient_clip_val={clip}"], tmp_path / clip)
        L.seed_everything(cfg.seed, verbose=False)  # as fit() does: the same initial weights
        start = build_run(cfg)[0].state_dict()
        end = fit(cfg)[0].state_dict()
        moved[clip] = float(torch.cat([(end[k] - v).flatten() for k, v in start.items()]).norm())
    assert moved["1e-6"] <= 6e-7 * 1.01 and moved["null"] > 1e-3, moved


def test_a_requeue_signal_saves_then_hands_over_to_the_launchers_handler(tmp_path):
    """Under submitit (hydra/launcher=slurm) SIGUSR2 belongs to submitit, which requeues the job: the callback saves
    the step first, then calls that handler (here a stand-in that records the call and exits, as submitit does)."""
    import lightning as L

    import flowdiff.runs as train_cli

    calls = []

    def launcher_handler(signum, frame):
        calls.append(signum)
        raise SystemExit(-1)  # submitit exits after requeueing

    class SignalAtStep3(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, launcher_handler)
    build = train_cli.build_callbacks
    try:
        train_cli.build_callbacks = lambda cfg, kind=None: [SignalAtStep3(), *build(cfg, kind)]
        with pytest.raises(SystemExit):
            fit(compose_cfg([*FAST, "trainer.max_steps=50", "data.steps_per_epoch=50"], tmp_path))
    finally:
        train_cli.build_callbacks = build
        signal.signal(signal.SIGUSR2, previous)
    assert calls == [signal.SIGUSR2]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_ctrl_c_during_the_final_evaluation_saves_and_stops(tmp_path):
    """A Ctrl-C that lands in the last validation (an FID can take minutes) is not dropped: the run saves, stops with
    the resume line and writes no metrics.json (it used to finish as if nothing had happened); afterwards the process
    has its own handlers back."""
    import lightning as L

    import flowdiff.runs as train_cli
    from flowdiff.errors import TrainingInterrupted

    class CtrlCInTheLastValidation(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.global_step == 6:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    build = train_cli.build_callbacks
    try:
        train_cli.build_callbacks = lambda cfg, kind=None: [CtrlCInTheLastValidation(), *build(cfg, kind)]
        with pytest.raises(TrainingInterrupted, match=r"^SIGINT received: saved step 6 to .*last.ckpt; resume with"):
            train(compose_cfg([*FAST, "callbacks.plot=null"], tmp_path))
    finally:
        train_cli.build_callbacks = build
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert not (tmp_path / "metrics.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # Lightning's teardown would have put flowdiff's back


def test_signal_handlers_are_the_processs_own_again_after_a_failed_fit(tmp_path):
    """A fit that ends by an exception leaves no flowdiff handler behind (Lightning's teardown reinstalled the ones
    it found at its start, flowdiff's): a later Ctrl-C in the same process (pytest, a notebook) interrupts it."""
    import lightning as L

    import flowdiff.runs as train_cli

    class Fails(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise RuntimeError("boom")

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    build = train_cli.build_callbacks
    try:
        train_cli.build_callbacks = lambda cfg, kind=None: [Fails(), *build(cfg, kind)]
        with pytest.raises(RuntimeError, match="boom"):
            train(compose_cfg([*FAST, "callbacks.plot=null"], tmp_path))
    finally:
        train_cli.build_callbacks = build
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_failed_job_returns_no_value_to_the_sweeper(tmp_path, monkeypatch):
    """In a multirun a failed job returns None, not NaN: Optuna's sweeper then records a failed trial (a NaN made
    study.tell raise and stopped the study after its first failure)."""
    import flowdiff.cli.train as train_cli

    monkeypatch.setattr(train_cli, "multirun", lambda: True)
    assert train_cli.main(compose_cfg([*FAST, "optimizer.weight_decay=-1"], tmp_path)) is None


def test_training_in_a_thread_runs_without_signal_handlers(tmp_path):
    """signal.signal works only in the main thread: a fit in another thread (a threading launcher) must still run."""
    import threading

    result = {}

    def run():
        try:
            result["metrics"] = train(compose_cfg([*FAST, "callbacks.plot=null"], tmp_path))
        except Exception as err:  # reported below
            result["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["metrics"]["global_step"] == 6
