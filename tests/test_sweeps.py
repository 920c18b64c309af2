"""The sweep summary: a table of every job of a multirun folder, and the metric-against-axis plot."""

import csv
import json

import pytest

from flowdiff.sweeps import collect, main, plot_summary, swept_keys, write_summary


def _job(root, num, overrides, status="completed", metrics=None, reason=""):
    d = root / ",".join(overrides)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    record = {"job": num, "status": status, "reason": reason, "seconds": 1.5 + num, "metrics": metrics or {}}
    (d / "job.json").write_text(json.dumps(record))
    return d


def test_summary_lists_every_job_with_its_choices_metrics_and_status(tmp_path):
    k = 0
    for sampler, w2s in (("euler", [0.9, 0.5, 0.3]), ("heun", [0.4, 0.31, 0.3])):
        for steps, w2 in zip((2, 8, 32), w2s):
            nfe = steps * (2 if sampler == "heun" else 1)
            _job(
                tmp_path,
                k,
                [f"sampler={sampler}", f"sampler.steps={steps}", "seed=0"],
                metrics={"val/w2": w2, "nfe": nfe},
            )
            k += 1
    _job(tmp_path, k, ["sampler=rk4", "sampler.steps=2", "seed=0"], "failed", reason="config error: no")
    killed = tmp_path / "sampler=rk4,sampler.steps=8,seed=0"
    (killed / ".hydra").mkdir(parents=True)
    (killed / ".hydra" / "overrides.yaml").write_text("- sampler=rk4\n- sampler.steps=8\n- seed=0\n")
    rows = collect(tmp_path)
    assert swept_keys(rows) == ["sampler", "sampler.steps"]  # seed is the same everywhere: not a column
    write_summary(tmp_path, plot={"x": "sampler.steps", "line": "sampler", "metric": "val/w2"})
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert list(table[0]) == ["job", "sampler", "sampler.steps", "status", "val/w2", "nfe", "seconds", "reason"]
    assert [r["status"] for r in table] == ["completed"] * 6 + ["failed", "no record"]
    assert table[1] == {
        "job": "1",
        "sampler": "euler",
        "sampler.steps": "8",
        "status": "completed",
        "val/w2": "0.5",
        "nfe": "8",
        "seconds": "2.5",
        "reason": "",
    }
    assert table[6]["reason"] == "config error: no" and "left no job.json" in table[7]["reason"]
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# Sweep") and "6 of 8 jobs completed" in md and md.count("\n|") == 10  # header, rule, 8 jobs
    assert (tmp_path / "summary_val_w2_vs_sampler.steps.png").stat().st_size > 5000
    by_nfe = plot_summary(rows, "nfe", "sampler", "val/w2", tmp_path)  # a recorded value as the axis
    assert by_nfe.name == "summary_val_w2_vs_nfe.png" and by_nfe.stat().st_size > 5000
    with pytest.raises(ValueError, match="no completed job has both sampler.steps and val/fid"):
        plot_summary(rows, "sampler.steps", "sampler", "val/fid", tmp_path)
    main([str(tmp_path), "--x", "sampler.steps", "--line", "sampler"])  # the command-line form
    assert (tmp_path / "summary.md").read_text() == md


@pytest.mark.slow
def test_gpu_launcher_runs_jobs_side_by_side_on_distinct_devices(tmp_path):
    """hydra/launcher=gpus on a faked 2-GPU machine: joblib runs 2 jobs at once, and jobs that overlap in time hold
    different devices; a 2 x 2 sweep with one impossible combination (Euler-Maruyama needs the score, which OT
    pairing breaks) leaves a 4-row summary with that job failed, with its reason, and three completed. About 25 s."""
    import os
    import subprocess
    import sys

    from helpers import FAST, ROOT

    env = {**os.environ, "FLOWDIFF_DEVICE_COUNT": "2", "WANDB_MODE": "offline"}
    sweep = ["sampler=euler,euler_maruyama", "coupling=independent,ot", "sampler.steps=20"]
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=gpus", *sweep, *FAST, "callbacks.plot=null"]
    proc = subprocess.run([*cmd, f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr[-3000:]  # a job failed (after all ran and the summary was written)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    status = {(r["sampler"], r["coupling"]): r["status"] for r in rows}
    assert status == {
        ("euler", "independent"): "completed",
        ("euler", "ot"): "completed",
        ("euler_maruyama", "independent"): "completed",
        ("euler_maruyama", "ot"): "failed",
    }
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["reason"].startswith("config error: sampler=euler_maruyama needs the score")
    jobs = [json.loads(p.read_text()) for p in tmp_path.glob("*/job.json")]
    assert sorted({j["device"] for j in jobs}) == [0, 1]
    overlapping = [
        (a, b)
        for i, a in enumerate(jobs)
        for b in jobs[i + 1 :]
        if a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]
    ]
    assert all(a["device"] != b["device"] for a, b in overlapping)  # (whether jobs overlap depends on timing)
    assert not list((tmp_path / ".devices").glob("*.lock"))  # every job gave its device back


@pytest.mark.slow
def test_submitit_local_sweep_finishes_with_its_logs_in_the_multirun_folder(tmp_path):
    """The SLURM launcher's engine, submitit, with its local executor (no cluster here): two jobs, each its own
    process, finish; their logs lie under <multirun dir>/.submitit/ and the summary lists both. About 30 s."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import os
    import subprocess
    import sys

    from helpers import FAST, ROOT

    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "seed=1,2", *FAST, "callbacks.plot=null"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([*cmd, f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list((tmp_path / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("val/w2 =" in p.read_text() for p in logs)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert sorted(r["seed"] for r in rows) == ["1", "2"] and {r["status"] for r in rows} == {"completed"}


@pytest.mark.slow
def test_optuna_sweep_minimises_w2_over_three_trials(tmp_path):
    """hparams_search=optuna with 3 trials: three jobs with three different learning rates from the search space,
    each a row of the summary, and Optuna's best value is the least val/w2 among them. About 16 s."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import os
    import subprocess
    import sys

    import yaml

    from helpers import FAST, ROOT

    cmd = [
        sys.executable,
        "train.py",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        *FAST,
        "callbacks.plot=null",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([*cmd, f"hydra.sweep.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    lrs = [float(r["optimizer.lr"]) for r in rows]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(float(r["val/w2"]) for r in rows), rel=1e-3)


def test_a_sweep_with_failed_jobs_exits_1_after_its_summary(tmp_path, capsys):
    """When the multirun ends with a failed or unrecorded job, the summary is written, the last line says how many
    failed and where the summary is, and the command exits 1; hydra.callbacks.summary.fail_on_failed_jobs=false
    keeps exit status 0; a sweep that completed says so."""
    from omegaconf import OmegaConf

    from flowdiff.sweeps import SweepSummary

    _job(tmp_path, 0, ["seed=0"], metrics={"val/w2": 0.4})
    _job(tmp_path, 1, ["seed=1"], "failed", reason="config error: no")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as stop:
        SweepSummary().on_multirun_end(config)
    assert stop.value.code == 1 and (tmp_path / "summary.md").exists()
    last = f"1 of 2 jobs failed; summary: {tmp_path / 'summary.md'}"
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    SweepSummary(fail_on_failed_jobs=False).on_multirun_end(config)
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    done = tmp_path / "done"
    _job(done, 0, ["seed=0"], metrics={"val/w2": 0.4})
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(done)}}}))
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"all 1 jobs completed; summary: {done / 'summary.md'}"


def test_summary_goes_to_the_sweeps_wandb_group(tmp_path, monkeypatch):
    """With logger=wandb the summary table is logged to a run named "summary" in the sweep's group (offline)."""
    wandb = pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from flowdiff.sweeps import _log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    _job(tmp_path, 0, ["objective=cfm"], metrics={"val/w2": 0.4})
    _job(tmp_path, 1, ["objective=score"], metrics={"val/w2": 0.5})
    config = OmegaConf.create(
        {"logger": {"wandb": {"_target_": "lightning.pytorch.loggers.WandbLogger", "project": "p"}}}
    )
    try:
        _log_to_wandb(config, tmp_path)
    finally:
        wandb.finish()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert tmp_path.name.encode() in record and b"summary" in record  # the group (the sweep folder), the run name
    tables = list(run_dir.glob("files/media/table/sweep_summary_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["columns"] == [
        "job",
        "objective",
        "status",
        "val/w2",
        "seconds",
        "reason",
    ]


def test_ddp_inside_a_local_sweep_is_one_sentence(tmp_path, monkeypatch):
    """Lightning would re-run the whole -m command line in each job's second process: refused, naming the ways."""
    from flowdiff.errors import ConfigError
    from flowdiff.runs import fit
    from helpers import FAST, compose_cfg

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    cfg = compose_cfg([*FAST, "trainer=ddp_cpu", "hydra.mode=MULTIRUN"], tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp inside a local -m sweep: .*hydra/launcher=slurm"):
        fit(cfg)


def test_a_device_is_held_by_one_job_at_a_time(tmp_path):
    """claim_device on 2 devices from 3 jobs: the first two get 0 and 1 at once, the third waits until one is given
    back and then gets it; the lock of a job that died (a PID that does not exist) is taken over."""
    import threading
    import time

    from flowdiff.runs import claim_device

    locks = tmp_path / ".devices"
    first, second = claim_device(locks, 2, first=0), claim_device(locks, 2, first=0)
    assert (first, second) == (0, 1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(claim_device(locks, 2, first=1, poll_s=0.02)))
    waiter.start()
    time.sleep(0.3)
    assert got == []  # both held: it waits
    (locks / "0.lock").unlink()  # job 0 ends
    waiter.join(timeout=5)
    assert got == [0]
    (locks / "1.lock").write_text("999999999")  # a job that died holding device 1
    assert claim_device(locks, 2, first=1) == 1
