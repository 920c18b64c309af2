"""W2 against NFE for every sampler on one trained 2D model (N->moons, OT-CFM, the tong_2d protocol).

The model is trained once with the velocity objective on the Gaussian path (path.sigma = 0, so the
SDE sampler has a score); each sampler then runs at several step counts on the same source points.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import QUIET, RESULTS, compose, markdown_table, save_json  # noqa: E402

from flowdiff.build import build_sampler, conf_node  # noqa: E402
from flowdiff.metrics import w2  # noqa: E402
from flowdiff.runs import fit  # noqa: E402

STEPS = {
    "euler": [2, 5, 10, 20, 50, 100],
    "midpoint": [1, 2, 5, 10, 25, 50],
    "heun": [1, 2, 5, 10, 25, 50],
    "rk4": [1, 2, 3, 5, 12, 25],
    "ddim": [2, 5, 10, 20, 50, 100],
    "euler_maruyama": [5, 10, 20, 50, 100, 500],
}
TOLERANCES = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--n-eval", type=int, default=5000)
    args = p.parse_args(argv)
    cfg = compose(
        [
            "experiment=tong_2d",
            "path.sigma=0.0",
            f"trainer.max_steps={args.steps}",
            f"data.steps_per_epoch={args.steps}",
            *QUIET,
        ]
    )
    module, dm, *_ = fit(cfg)
    g = torch.Generator().manual_seed(123)
    test = dm.target.sample(args.n_eval, g)[0]
    floor = w2(dm.target.sample(args.n_eval, g)[0], test)
    x0 = torch.randn(args.n_eval, 2, generator=g)
    rows, points = [], {}
    for name, steps_list in {**STEPS, "dopri5": TOLERANCES}.items():
        for s in steps_list:
            settings = {"rtol": s, "atol": s} if name == "dopri5" else {"steps": s}
            if name == "euler_maruyama":
                settings.update(sigma=1.0, sigma_schedule="beta")
            out = module.sample(
                args.n_eval,
                sampler=build_sampler(conf_node("sampler", name, **settings), module.path),
                x0=x0,
                generator=torch.Generator().manual_seed(0),
            )
            dist = w2(out.x, test)
            points.setdefault(name, []).append((out.nfe, dist))
            rows.append([name, f"tol {s:g}" if name == "dopri5" else s, out.nfe, f"{dist:.4f}"])
            print(rows[-1], flush=True)
    save_json("sampler_curves", {"args": vars(args), "floor": floor, "points": points})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, pts in points.items():
        nfe, dist = zip(*sorted(pts))
        ax.plot(nfe, dist, "o-", label=name)
    ax.axhline(floor, color="gray", ls="--", label=f"floor ({floor:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(f"W2 ({args.n_eval} points)")
    ax.set_title("N -> moons, OT-CFM: W2 against network evaluations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "sampler_curves.png", dpi=110)
    table = markdown_table(["sampler", "steps", "NFE", "W2"], rows)
    return (
        f"Floor (two independent {args.n_eval}-point test sets): {floor:.4f}\n\n"
        + table
        + "\n\n![W2 against NFE](bench/sampler_curves.png)"
    )


if __name__ == "__main__":
    print(main())
