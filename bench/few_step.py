"""Few-step generation on the 2D toys: a teacher, its 2-rectified flow, distilled students and consistency models,
W2 against NFE in {1, 2, 4, 8, 100} and straightness, with the finite-sample floor; a figure of one-step samples.

Every model is trained by ``train.py`` itself (the stages as a user runs them) and read back from its
``metrics.json`` (``val/w2_nfe<k>``, ``val/straightness``, ``val/w2_floor``: 2,000 points against 2,000 held-out).

    python bench/few_step.py                 # 5,000 steps per model: about 9 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "bench"
NFE = (1, 2, 4, 8, 100)
TASKS = {"N->moons": "moons", "N->8gaussians": "8gaussians"}
#: model -> (its run folder, overrides, the run whose checkpoint is its teacher, its one-step target against the
#: teacher's 100 steps)
MODELS = {
    "teacher (1-rectified flow)": ("teacher", [], None, None),
    "2-rectified flow": ("reflow", ["stage=reflow", "stage.n_pairs=20000"], "teacher", 1.5),
    "distilled, 1 step": ("distilled", ["stage=distill", "stage.steps=1", "stage.n_pairs=20000"], "teacher", 1.3),
    "2-RF + distilled, 1 step": (
        "reflow_distill",
        ["stage=distill", "stage.steps=1", "stage.n_pairs=20000"],
        "reflow",
        1.3,
    ),
    "consistency distillation": ("cd", ["stage=consistency"], "teacher", 2.0),
    "consistency training": ("ct", ["stage=consistency"], None, None),
}


def train(data: str, name: str, out: Path, steps: int, seed: int, models: dict = MODELS) -> dict:
    folder, overrides, teacher_of, _ = models[name]
    run = out / data / folder
    cmd = [sys.executable, str(ROOT / "train.py"), f"data={data}", f"seed={seed}", *overrides]
    cmd += [f"trainer.max_steps={steps}", f"data.steps_per_epoch={steps}", f"hydra.run.dir={run}"]
    cmd += [f"log_root={out}", "callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "logger=csv"]
    if teacher_of is not None:
        cmd.append(f"teacher={out / data / teacher_of / 'checkpoints' / 'last.ckpt'}")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    print(f"{data:12s} {name:28s} one-step W2 {metrics['val/w2_nfe1']:.3f} ({metrics['wall_seconds']:.0f} s)")
    return metrics


def figure(out: Path, results: dict, path: Path) -> None:
    """One-step samples of each model (and the teacher's 100 steps), a row per task."""
    sys.path.insert(0, str(ROOT / "src"))
    from flowdiff.build import load_checkpoint
    from flowdiff.plotting import plt

    panels = [("teacher (1-rectified flow)", 100), *[(name, 1) for name in MODELS]]
    fig, axes = plt.subplots(len(TASKS), len(panels), figsize=(2.6 * len(panels), 2.7 * len(TASKS)), squeeze=False)
    for row, (task, data) in enumerate(TASKS.items()):
        for col, (name, k) in enumerate(panels):
            module, dm, _ = load_checkpoint(out / data / MODELS[name][0] / "checkpoints" / "last.ckpt")
            x = module.sample(2000, sampler=module.sampler.with_steps(k), generator=torch.Generator().manual_seed(0)).x
            ref = dm.test_set["x1"][:2000]
            ax = axes[row][col]
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8")
            ax.scatter(x[:, 0], x[:, 1], s=1, c="C0" if k > 1 else "C3")
            w2 = results[task][name][f"val/w2_nfe{k}"]
            ax.set_title(f"{name.split(',')[0]}\n{k} step{'s' if k > 1 else ''}, W2 {w2:.2f}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlim(ref[:, 0].min() - 1, ref[:, 0].max() + 1), ax.set_ylim(ref[:, 1].min() - 1, ref[:, 1].max() + 1)
        axes[row][0].set_ylabel(task)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def table(results: dict, steps: int) -> str:
    lines = []
    for task, rows in results.items():
        teacher = rows["teacher (1-rectified flow)"]["val/w2_nfe100"]
        floor = rows["teacher (1-rectified flow)"]["val/w2_floor"]
        lines += [f"**{task}** (teacher's 100-step W2 {teacher:.3f}; floor {floor:.3f}; {steps} steps each)", ""]
        lines += [
            "| model | straightness | " + " | ".join(f"W2 NFE {k}" for k in NFE) + " | 1-step / teacher | target |"
        ]
        lines += ["|---" * (len(NFE) + 4) + "|"]
        for name, m in rows.items():
            ratio = m["val/w2_nfe1"] / teacher
            target = MODELS[name][3]
            verdict = "" if target is None else f"<= {target}x: {'met' if ratio <= target else 'missed'}"
            cells = [f"{m['val/w2_nfe' + str(k)]:.3f}" for k in NFE]
            lines.append(
                f"| {name} | {m['val/straightness']:.4f} | " + " | ".join(cells) + f" | {ratio:.2f}x | {verdict} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000, help="training steps of every model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/flowdiff-few-step"))
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "few_step_2d.png")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    start = time.perf_counter()
    for task, data in TASKS.items():
        results[task] = {name: train(data, name, args.out, args.steps, args.seed) for name in MODELS}
    minutes = (time.perf_counter() - start) / 60
    md = table(results, args.steps)
    print(md)
    print(f"{minutes:.1f} minutes in all")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "few_step_2d.json").write_text(
        json.dumps({"steps": args.steps, "minutes": minutes, **results}, indent=2)
    )
    (RESULTS / "few_step_2d.md").write_text(md)
    figure(args.out, results, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
