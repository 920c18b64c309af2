"""Shared helpers of the benchmarks: composing configs, evaluation by W2 / NPE, timing, Markdown tables."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "bench"
sys.path.insert(0, str(ROOT / "tests"))

from flowdiff.metrics import w2  # noqa: E402
from flowdiff.samplers import EulerSampler  # noqa: E402
from helpers import compose_cfg  # noqa: E402

# no validation, plots, checkpoints, EMA or progress bar: the benchmarks evaluate the trained model themselves
QUIET = [f"callbacks.{c}=null" for c in ("metrics", "plot", "checkpoint", "last_checkpoint", "progress_bar", "ema")] + [
    "logger=[]",
    "trainer.enable_progress_bar=false",
    "trainer.check_val_every_n_epoch=100000",
]


def compose(overrides: list[str], run_dir: Path | str | None = None):
    """The config of ``overrides``, in ``run_dir`` (a fresh temporary folder by default: a run dir holding a
    checkpoint is resumed, so two models must never share one)."""
    import tempfile

    return compose_cfg(overrides, run_dir or tempfile.mkdtemp(prefix="flowdiff-bench-"))


def median_ms(fn: Callable[[], object], repeats: int = 7, inner: int = 1, sync: Callable[[], None] = lambda: None):
    """Median over ``repeats`` of the wall time of ``inner`` calls, in ms per call (after one warm-up)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - start) * 1000 / inner)
    return statistics.median(times)


@torch.no_grad()
def evaluate_velocity(
    velocity_fn, source: torch.Tensor, test: torch.Tensor, test2: torch.Tensor, steps: int = 100, sample_fn=None
):
    """W2 of 100-step Euler samples against ``test``, the floor W2(test2, test), and the normalised path energy.

    ``sample_fn(sampler, x0)`` draws the samples (flowdiff: ``FlowModule.sample``, which starts where the objective
    allows and ends with the data prediction where it stops before t = 1); by default Euler on ``velocity_fn``.
    NPE = |E int ||v||^2 dt - W2^2(source, target)| / W2^2(source, target), the energy summed along the
    Euler trajectory (h ||v(x_k, t_k)||^2 per step), W2^2(source, target) by exact EMD.
    """
    sampler = EulerSampler(steps=steps)
    if sample_fn is None:
        out = sampler.sample(velocity_fn, source, return_trajectory=True)
    else:
        out = sample_fn(sampler, source)
    energy = 0.0
    for k in range(steps):
        h = (out.times[k + 1] - out.times[k]).item()
        t = out.times[k].expand(source.shape[0])
        energy += h * velocity_fn(out.trajectory[k], t).pow(2).sum(1).mean().item()
    w2_st = w2(source, test) ** 2
    x = out.x
    finite = bool(torch.isfinite(x).all())
    return {
        "w2": w2(x, test) if finite else float("inf"),
        "floor": w2(test2, test),
        "npe": abs(energy - w2_st) / w2_st,
    }


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_json(name: str, data) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
