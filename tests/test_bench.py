"""The benchmark scripts run end to end at toy sizes and produce finite, well-formed tables (slow)."""

import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))

pytestmark = pytest.mark.slow


def test_table_2d_pipeline(monkeypatch, tmp_path):
    import common
    import table_2d

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    text = table_2d.main(["--steps", "30", "--seeds", "2", "--n-eval", "200", "--tasks", "N->moons", "--no-torchcfm"])
    w2_rows = [line for line in text.splitlines() if line.startswith("| OT-CFM (flowdiff)")]
    assert len(w2_rows) == 3  # the W2, NPE and wall-time tables
    value = float(w2_rows[0].split("|")[2].split("±")[0])
    assert 0 < value < 10
    assert (tmp_path / "table_2d.json").exists()


def test_sampler_curves_and_overhead(monkeypatch, tmp_path):
    import common
    import overhead
    import sampler_curves

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sampler_curves, "RESULTS", tmp_path)
    text = sampler_curves.main(["--steps", "30", "--n-eval", "200"])
    assert "| dopri5 |" in text and (tmp_path / "sampler_curves.png").exists()
    text = overhead.main(["--steps", "60", "--repeats", "1", "--n-sample", "256", "--unet-steps", "0"])
    ratio = next(line for line in text.splitlines() if "ratio raw / train.py" in line)
    assert 0 < float(ratio.split("|")[2].strip(" *")) < 2
    assert "| backward |" in text and "| EMA |" in text  # the breakdown by hooks and by parts
