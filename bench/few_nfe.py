"""Few-NFE sampling on the 2D toys: W2 against the number of network evaluations for euler, heun, dpmpp (DPM-Solver++
2M) and edm (EDM's Heun), each on the uniform grid and on its best other grid, for a velocity (cfm) and a noise
model, beside the 100-step W2 and the finite-sample floor; writes docs/bench/few_nfe.{json,md,png}.

    python bench/few_nfe.py                 # 4 models of 5,000 steps and the curves: about 6 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import QUIET, RESULTS, compose, markdown_table, save_json  # noqa: E402

from flowdiff.build import build_sampler, conf_node  # noqa: E402
from flowdiff.metrics import w2  # noqa: E402
from flowdiff.runs import fit  # noqa: E402

NFE = (4, 6, 8, 10, 16, 20, 50)
SAMPLERS = ("euler", "heun", "dpmpp", "edm")
GRIDS = ("uniform", "edm", "logsnr", "shift")
TASKS = {"N->moons": "moons", "N->8gaussians": "8gaussians"}
OBJECTIVES = {"velocity": "cfm", "noise": "noise"}


def steps_for(sampler, nfe: int, denoises: bool) -> int | None:
    """The most steps of ``sampler`` within ``nfe`` evaluations (a final denoising step costs one more)."""
    budget = nfe - int(denoises)
    if sampler == "heun":
        return budget // 2 or None
    if sampler == "edm":  # 2 per step, 1 on the last step to the data
        return (budget + 1) // 2 or None
    return budget or None


def curve(module, x0, ref, sampler: str, grid: str) -> dict[int, float]:
    out = {}
    for nfe in NFE:
        smp = build_sampler(conf_node("sampler", sampler, grid=grid), module.path)
        t_hi = module.objective.sample_time_range(module.path, fields=smp.fields)[1]
        steps = steps_for(sampler, nfe, denoises=t_hi < 1)
        if steps is None:
            continue
        smp = smp.with_steps(steps)
        res = module.sample(len(x0), sampler=smp, x0=x0, generator=torch.Generator().manual_seed(0))
        out[res.nfe] = w2(res.x.cpu(), ref) if bool(torch.isfinite(res.x).all()) else float("inf")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--n-eval", type=int, default=2000)
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from docs/bench/few_nfe.json")
    args = p.parse_args(argv)
    if args.plot_only:
        return figure(json.loads((RESULTS / "few_nfe.json").read_text()))
    results, rows = {}, []
    start = time.perf_counter()
    for task, data in TASKS.items():
        for objective_name, objective in OBJECTIVES.items():
            cfg = compose(
                [
                    f"data={data}",
                    f"objective={objective}",
                    f"trainer.max_steps={args.steps}",
                    f"data.steps_per_epoch={args.steps}",
                    *QUIET,
                ]
            )
            lightning_module, dm, *_ = fit(cfg)
            module = lightning_module.model.eval()
            g = torch.Generator().manual_seed(123)
            ref = dm.target.sample(args.n_eval, g)[0]
            floor = w2(dm.target.sample(args.n_eval, g)[0], ref)
            x0 = torch.randn(args.n_eval, 2, generator=g)
            euler100 = build_sampler(conf_node("sampler", "euler", steps=100), module.path)
            w2_100 = w2(module.sample(args.n_eval, sampler=euler100, x0=x0).x, ref)
            entry = {"floor": floor, "euler_100": w2_100, "curves": {}}
            for sampler in SAMPLERS:
                curves = {grid: curve(module, x0, ref, sampler, grid) for grid in GRIDS}
                entry["curves"][sampler] = curves
            results[f"{task} {objective_name}"] = entry
            print(f"{task} {objective_name}: Euler-100 W2 {w2_100:.3f}, floor {floor:.3f} "
                  f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    for key, entry in results.items():
        for sampler, curves in entry["curves"].items():
            at8 = {grid: min((w for n, w in c.items() if n <= 8), default=float("inf")) for grid, c in curves.items()}
            best = min((g for g in GRIDS if g != "uniform"), key=lambda g: at8[g])
            rows.append([key, sampler, f"{at8['uniform']:.3f}", best, f"{at8[best]:.3f}",
                         f"{min(at8.values()) / entry['euler_100']:.2f}", f"{entry['euler_100']:.3f}",
                         f"{entry['floor']:.3f}"])  # fmt: skip
    header = ["model", "sampler", "W2 at NFE <= 8, uniform", "best other grid", "its W2", "best / Euler-100",
              "Euler-100", "floor"]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    save_json(
        "few_nfe",
        {
            k: {
                **v,
                "curves": {
                    s: {g: {str(n): w for n, w in c.items()} for g, c in cs.items()} for s, cs in v["curves"].items()
                },
            }
            for k, v in results.items()
        },
    )
    (RESULTS / "few_nfe.md").write_text(table + "\n")
    figure(results)


def figure(results: dict) -> None:
    """W2 against NFE per model: each sampler on the uniform grid (solid) and its best other grid (dashed)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, entry) in zip(axes.flat, results.items()):
        for sampler, curves in entry["curves"].items():
            at8 = {g: min((w for n, w in c.items() if int(n) <= 8), default=float("inf")) for g, c in curves.items()}
            best = min((g for g in GRIDS if g != "uniform"), key=lambda g: at8[g])
            for grid, style in (("uniform", "-"), (best, "--")):
                c = curves[grid]
                ax.plot([int(n) for n in c], list(c.values()), style, marker="o", ms=3, label=f"{sampler} ({grid})")
        ax.axhline(entry["euler_100"], color="k", lw=0.8, label="Euler, 100 steps")
        ax.axhline(entry["floor"], color="gray", lw=0.8, ls=":", label="floor (2,000 vs 2,000)")
        ax.set(
            xscale="log",
            yscale="log",
            title=key,
            xlabel="NFE",
            ylabel="W2",
            ylim=(0.8 * entry["floor"], 4 * entry["euler_100"]),
        )
        ax.set_xticks(list(NFE))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "few_nfe.png", dpi=100)


if __name__ == "__main__":
    main()
