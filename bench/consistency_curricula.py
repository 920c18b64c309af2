"""Consistency training's curricula on the 2D toys, over seeds: W2 at 1, 2 and 100 steps of Song et al. 2023's
(``curriculum=song``, the default: N growing as a square root, uniform in t) against improved CT's (``curriculum=ict``:
doubling N, Karras sigma grid through the path, lognormal intervals, 1 / dsigma weights), with EDM's sigmas and with
them scaled to the data's standard deviation; the same pseudo-Huber loss and mu0 = 0 target; mean and sd over seeds.

    python bench/consistency_curricula.py    # 2 tasks x 3 curricula x 3 seeds x 5,000 steps: about 10 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from few_step import RESULTS, TASKS, train

#: the data's standard deviation (all coordinates, 20,000 draws): iCT's sigmas are EDM's, for data of sd 0.5
SIGMA_DATA = {"moons": 1.435, "8gaussians": 3.674}


def curricula(data: str) -> dict:
    """label -> (run folder, overrides, teacher, target), as few_step.MODELS."""
    scaled = [f"stage.curriculum.sigma_data={SIGMA_DATA[data]}"]
    return {
        "Song et al. (default)": ("ct_song", ["stage=consistency", "curriculum=song"], None, None),
        "iCT (EDM's sigmas)": ("ct_ict", ["stage=consistency", "curriculum=ict"], None, None),
        "iCT, sigma_data = the data's sd": (
            "ct_ict_scaled",
            ["stage=consistency", "curriculum=ict", *scaled],
            None,
            None,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/flowdiff-curricula"))
    args = parser.parse_args()
    start = time.perf_counter()
    results = {
        task: {
            label: [
                train(data, label, args.out / f"seed{seed}", args.steps, seed, curricula(data)) for seed in args.seeds
            ]
            for label in curricula(data)
        }
        for task, data in TASKS.items()
    }
    lines = [
        f"Consistency training, {args.steps} steps, seeds {args.seeds}: W2 (mean ± sd over seeds) against the "
        "finite-sample floor",
        "",
        "| task | curriculum | W2 NFE 1 | W2 NFE 2 | W2 NFE 100 | floor |",
        "|---|---|---|---|---|---|",
    ]
    for task, rows in results.items():
        for label, runs in rows.items():
            cells = []
            for k in (1, 2, 100):
                values = [m[f"val/w2_nfe{k}"] for m in runs]
                cells.append(
                    f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"
                )
            floor = runs[0]["val/w2_floor"]
            lines.append(f"| {task} | {label} | " + " | ".join(cells) + f" | {floor:.3f} |")
    md = "\n".join(lines) + f"\n\n{(time.perf_counter() - start) / 60:.1f} minutes in all\n"
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "consistency_curricula.md").write_text(md)
    (RESULTS / "consistency_curricula.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
