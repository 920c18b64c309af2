"""The lecture-5 toy: a flow policy and regression on the planar reach round a disc, side by side.

Trains ``experiment=obstacle_flow`` and ``experiment=obstacle_regression`` (2,000 steps each, about a minute each
on 2 CPU cores), rolls each out for 50 episodes from starts disjoint from the demonstrations, and draws both
(``docs/bench/obstacle.png``) with the expert's demonstrations.

    python bench/obstacle.py
"""

from __future__ import annotations

import argparse
import contextlib
import io

from common import RESULTS, compose, markdown_table, save_json

from flowdiff.policies.rollout import rollout
from flowdiff.runs import fit


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--episodes", type=int, default=50)
    args = p.parse_args(argv)
    quiet = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", f"trainer.max_steps={args.steps}"]
    results, dm = {}, None
    for name in ("obstacle_flow", "obstacle_regression"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module, dm, trainer, _, seconds = fit(compose([f"experiment={name}", *quiet]))
        model = module.model.eval()
        out = rollout(model, dm, args.episodes, dm.evaluation_seed(1))
        out["train_s"] = seconds
        results[name] = out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = dm.make_env(1, 0)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6))
    panels = [("expert demonstrations", None), ("regression (one data step)", "obstacle_regression")]
    panels.append(("flow policy (10 Euler steps)", "obstacle_flow"))
    for ax, (title, key) in zip(axes, panels):
        ax.add_patch(plt.Circle((0, 0), env.radius, color="0.6"))
        ax.plot(*env.goal.tolist(), marker="*", color="k", markersize=14, linestyle="none")
        if key is None:
            for ep in dm.episodes[:50]:
                ax.plot(ep["obs"][:, 0], ep["obs"][:, 1], color="tab:blue", alpha=0.5, lw=1)
        else:
            r = results[key]
            for path, ok in zip(r["paths"], r["success"]):
                ax.plot(path[:, 0], path[:, 1], color="tab:green" if ok else "tab:red", alpha=0.5, lw=1)
            title += f": {r['success_rate']:.0%} succeed"
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.3, 1.3)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "obstacle.png", dpi=120)
    plt.close(fig)
    numbers = {k: {m: float(v) for m, v in r.items() if isinstance(v, (int, float))} for k, r in results.items()}
    save_json("obstacle", numbers)
    rows = [["expert", f"{dm.expert_success_rate:.0%}", "", "", ""]]
    for key, label in (("obstacle_regression", "regression"), ("obstacle_flow", "flow policy")):
        r = results[key]
        rows.append(
            [label, f"{r['success_rate']:.0%}", f"{r['nfe']}", f"{r['ms_per_chunk']:.1f}", f"{r['train_s']:.0f}"]
        )
    head = ["policy", f"success ({args.episodes} episodes)", "NFE per chunk", "ms per chunk", "training s"]
    return markdown_table(head, rows)


if __name__ == "__main__":
    print(main())
