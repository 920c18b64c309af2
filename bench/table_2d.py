"""The 2D table of Tong et al. (TorchCFM / [SF]2M, Table 2) with flowdiff and torchcfm side by side.

Tasks N->moons, N->8gaussians, moons->8gaussians, N->scurve; methods I-CFM and OT-CFM (sigma 0.1) in
both libraries, and flowdiff's score and noise objectives (Gaussian sources only). Same data samplers
(flowdiff's, the runner's definitions), MLP 3 x 64 SELU, AdamW 1e-3 / 1e-5, batch 256, same steps and
seeds, no EMA in either; both sampled by the same 100-step Euler; W2 by exact EMD on n_eval points.

    python bench/table_2d.py --steps 20000 --seeds 5 --n-eval 10000   # the published protocol
"""

from __future__ import annotations

import argparse
import time

import torch
from common import QUIET, compose, evaluate_velocity, markdown_table, mean_sd, save_json

from flowdiff.data.datamodule import ToyDataModule
from flowdiff.runs import fit

TASKS = {  # name -> data config
    "N->moons": "moons",
    "N->8gaussians": "8gaussians",
    "moons->8gaussians": "moons_to_8gaussians",
    "N->scurve": "scurve",
}
OURS = {  # method -> overrides
    "I-CFM": ["objective=cfm", "coupling=independent", "path.sigma=0.1"],
    "OT-CFM": ["objective=cfm", "coupling=ot", "path.sigma=0.1"],
    "score": ["objective=score", "coupling=independent", "path.sigma=0.0"],
    "noise": ["objective=noise", "coupling=independent", "path.sigma=0.0"],
}
PUBLISHED = {  # OT-CFM and I-CFM, [SF]2M Table 2 (W2) and NPE (see shared/ANCHORS.md)
    ("OT-CFM", "N->moons"): (0.130, 0.083),
    ("OT-CFM", "N->8gaussians"): (0.303, 0.031),
    ("OT-CFM", "moons->8gaussians"): (0.601, 0.015),
    ("OT-CFM", "N->scurve"): (0.144, 0.027),
    ("I-CFM", "N->moons"): (0.178, 0.891),
    ("I-CFM", "N->8gaussians"): (0.373, 0.202),
    ("I-CFM", "moons->8gaussians"): (1.557, 2.680),
    ("I-CFM", "N->scurve"): (0.242, 0.856),
}


def eval_sets(data: str, n: int, seed: int):
    dm = ToyDataModule(**{k: v for k, v in compose([f"data={data}"]).data.items() if k != "_target_"})
    g = torch.Generator().manual_seed(10_000 + seed)
    test = dm.target.sample(n, g)[0]
    test2 = dm.target.sample(n, g)[0]
    source = torch.randn(n, dm.dim, generator=g) if dm.gaussian_source else dm.source.points(n, g)
    return source, test, test2


def run_ours(task: str, method: str, steps: int, seed: int, n_eval: int):
    data = TASKS[task]
    cfg = compose(
        [
            "experiment=tong_2d",
            f"data={data}",
            *OURS[method],
            f"trainer.max_steps={steps}",
            f"data.steps_per_epoch={steps}",
            f"seed={seed}",
            *QUIET,
        ]
    )
    module, *_, seconds = fit(cfg)

    def sample_fn(sampler, x0):  # as users sample: the objective's range, the last step to t = 1
        return module.sample(len(x0), sampler=sampler, x0=x0, return_trajectory=True)

    res = evaluate_velocity(module.vector_fields().velocity, *eval_sets(data, n_eval, seed), sample_fn=sample_fn)
    return {**res, "seconds": seconds, "ms_per_step": 1000 * seconds / steps}


def run_torchcfm(task: str, method: str, steps: int, seed: int, n_eval: int):
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )
    from torchcfm.models import MLP

    data = TASKS[task]
    cfg = compose(["experiment=tong_2d", f"data={data}", f"seed={seed}"])
    torch.manual_seed(seed)
    dm = ToyDataModule(**{k: v for k, v in cfg.data.items() if k != "_target_"})
    model = MLP(dim=2, w=64, time_varying=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    fm = (ExactOptimalTransportConditionalFlowMatcher if method == "OT-CFM" else ConditionalFlowMatcher)(sigma=0.1)
    batches = iter(dm.train_dataloader())
    start = time.perf_counter()
    for step in range(steps):
        if step % dm.steps_per_epoch == 0 and step:
            batches = iter(dm.train_dataloader())
        batch = next(batches)
        x1 = batch["x1"]
        x0 = batch.get("x0", torch.randn_like(x1))
        t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
        loss = (model(torch.cat([xt, t[:, None]], -1)) - ut).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start

    def velocity(x, t):
        return model(torch.cat([x, t[:, None]], -1))

    res = evaluate_velocity(velocity, *eval_sets(data, n_eval, seed))
    return {**res, "seconds": seconds, "ms_per_step": 1000 * seconds / steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n-eval", type=int, default=5000)
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--no-torchcfm", action="store_true")
    args = p.parse_args(argv)
    runs = []
    for task in args.tasks:
        for seed in range(args.seeds):
            for method in OURS:
                if method in ("score", "noise") and task.startswith("moons->"):
                    continue  # a non-Gaussian source has no score
                runs.append(
                    {
                        "lib": "flowdiff",
                        "task": task,
                        "method": method,
                        "seed": seed,
                        **run_ours(task, method, args.steps, seed, args.n_eval),
                    }
                )
                print(runs[-1], flush=True)
            if not args.no_torchcfm:
                for method in ("I-CFM", "OT-CFM"):
                    runs.append(
                        {
                            "lib": "torchcfm",
                            "task": task,
                            "method": method,
                            "seed": seed,
                            **run_torchcfm(task, method, args.steps, seed, args.n_eval),
                        }
                    )
                    print(runs[-1], flush=True)
    save_json("table_2d", {"args": vars(args), "runs": runs})
    return render(runs, args)


def render(runs, args) -> str:
    keys = sorted(
        {(r["lib"], r["method"]) for r in runs}, key=lambda k: (["I-CFM", "OT-CFM", "score", "noise"].index(k[1]), k[0])
    )

    def metric_rows(metric: str) -> list[list[str]]:
        """One row per (library, method): mean ± sd of ``metric`` per task, then the published values."""
        rows = []
        for lib, method in keys:
            row = [f"{method} ({lib})"]
            for task in args.tasks:
                sel = [r[metric] for r in runs if (r["lib"], r["method"], r["task"]) == (lib, method, task)]
                row.append(mean_sd(sel) if sel else "—")
            rows.append(row)
        if metric == "w2":
            rows.append(
                ["finite-sample floor"]
                + [
                    mean_sd(
                        [r["floor"] for r in runs if (r["task"], r["lib"], r["method"]) == (t, "flowdiff", "I-CFM")]
                    )
                    for t in args.tasks
                ]
            )
        column = {"w2": 0, "npe": 1}[metric]
        for method in ("OT-CFM", "I-CFM"):
            rows.append([f"{method} (published)"] + [f"{PUBLISHED[(method, t)][column]:.3f}" for t in args.tasks])
        return rows

    time_rows = []
    for lib, method in keys:
        sel = [r for r in runs if (r["lib"], r["method"]) == (lib, method)]
        time_rows.append(
            [
                f"{method} ({lib})",
                mean_sd([r["ms_per_step"] for r in sel]),
                f"{sum(r['seconds'] for r in sel) / len(sel):.1f}",
            ]
        )
    return "\n\n".join(
        [
            markdown_table(["W2"] + args.tasks, metric_rows("w2")),
            markdown_table(["NPE"] + args.tasks, metric_rows("npe")),
            markdown_table(["wall time", "ms per training step", "s per run"], time_rows),
        ]
    )


if __name__ == "__main__":
    print(main())
