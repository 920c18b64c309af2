"""Checkpoints written by earlier flowdiff (tests/data/checkpoints, see its README) still load, sample as they did,
and resume."""

import shutil
from pathlib import Path

import pytest
import torch

from helpers import FAST, compose_cfg

DATA = Path(__file__).parent / "data" / "checkpoints"
REFERENCE = torch.load(DATA / "reference_samples.pt", weights_only=False)


@pytest.mark.parametrize("name", ["flow", "consistency", "score_ot", "distill"])
def test_old_checkpoints_sample_as_they_did(name):
    from flowdiff.build import load_checkpoint

    module, _, _ = load_checkpoint(DATA / f"{name}.ckpt")
    ref = REFERENCE[name]
    out = module.sample(64, y=ref["y"], generator=torch.Generator().manual_seed(0))
    assert out.nfe == ref["nfe"]
    torch.testing.assert_close(out.x, ref["x"], rtol=1e-5, atol=1e-6)


def test_old_checkpoints_resume_and_sample_py_reads_them(tmp_path):
    from flowdiff.evaluation import sample
    from flowdiff.runs import train

    ckpt = tmp_path / "flow.ckpt"
    shutil.copy(DATA / "flow.ckpt", ckpt)
    old = torch.load(ckpt, weights_only=False)
    goal = ["data=moons", "guidance=cfg", "net.width=16", "net.depth=2", *FAST, "trainer.max_steps=33"]
    metrics = train(compose_cfg([*goal, f"ckpt_path={ckpt}", "data.steps_per_epoch=30"], tmp_path / "resumed"))
    assert old["global_step"] == 30 and metrics["global_step"] == 33
    out = sample(compose_cfg([f"ckpt={DATA / 'distill.ckpt'}", "n=64"], tmp_path / "s", config="sample"))
    assert out["nfe"] == 2 and out["w2"] > 0
