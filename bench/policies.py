"""Policies on Meta-World: the flow policy, a diffusion policy, behaviour cloning by regression and a one-step
student of the flow policy, trained on the same scripted experts' demonstrations with the same network, scored by
success rate in the simulator.

For each task, method, number of demonstrations and seed: ``train.py experiment=metaworld_<task>`` with the
method's overrides, then ``--episodes`` rollouts from starts disjoint from the demonstrations (receding horizon,
the data's ``n_action_steps`` of each chunk); the experts' own rate from the same starts beside. Writes
``docs/bench/policies.{json,md}`` and the flow policy's rollouts of the first task (``policies_rollouts.png``).

    python bench/policies.py                       # the issue's protocol: 5 tasks x 4 methods x {10, 50} x 3 seeds
    python bench/policies.py --demos 50 --seeds 0  # one seed (what docs/BENCHMARKS.md reports; budget printed)

ms per chunk: the median of 7 re-plans of ``--episodes`` chunks after a warm-up, the network alone.

Needs ``pip install -e '.[robot]'``. CPU budget, measured 2026-12-02 on 2 cores: 0.4-7 minutes per run (2,000
steps of the policy MLP at batch 256 and 50 episodes; the spread is other work on the cores); the full protocol's
100 runs took about 2 hours.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, compose, markdown_table, median_ms, save_json

from flowdiff.build import load_checkpoint
from flowdiff.policies.metaworld import run_expert
from flowdiff.policies.rollout import plot_rollouts, rollout
from flowdiff.runs import fit

TASKS = ["reach", "push", "drawer-open", "door-open", "button-press"]
METHODS = {  # the same net, demonstrations and chunking; what differs is the objective, path, times and sampler
    "flow": [],  # experiment=metaworld_flow: CondOT velocity, Beta times, 10 Euler steps (pi-0)
    "diffusion": ["objective=noise", "path=linear_vp", "time=uniform", "sampler=ddim", "sampler.steps=10"],
    # behaviour cloning: a data-objective model, one step from noise at t = 0, is E[actions | observation]
    "regression": ["objective=data", "time=uniform", "sampler=consistency", "sampler.steps=1"],
    # a one-step student of the flow policy (its teacher trained first, in the same run): stage=distill steps=1 on
    # the teacher's 10-step Euler chunks for 20,000 (noise, observation) pairs of the data
    "student": ["stage=distill", "stage.steps=1", "sampler@stage.sampler=euler", "stage.sampler.steps=10"],
}
QUIET = [
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "callbacks.rollout=null",  # the bench rolls out itself, once, at the end
    "callbacks.checkpoint=null",
    "callbacks.last_checkpoint=null",
    "logger=[]",
]


def chunk_ms(model, dm, episodes: int) -> float:
    """Median ms of one re-plan: ``episodes`` chunks from ``episodes`` of the data's contexts (7 repeats, after a
    warm-up), the network alone."""
    context = dm.contexts[:episodes].to(model.device)
    return median_ms(lambda: model.sample(len(context), y=context))


def evaluate(model, dm, episodes: int) -> dict:
    """``episodes`` rollouts from the run's evaluation starts, and ms per chunk timed apart (the rollout's mean holds
    one-time costs)."""
    out = rollout(model.eval(), dm, episodes, dm.evaluation_seed(1))
    out["ms_per_chunk"] = chunk_ms(model, dm, episodes)
    return out


def run(task: str, method: str, demos: int, seed: int, steps: int, episodes: int, teacher_dir: Path) -> dict:
    """One training run and its rollouts. The flow policy keeps its last checkpoint in ``teacher_dir``: the
    one-step student of the same task, demonstrations and seed distills that run (trained first where missing)."""
    name = task.replace("-", "_")
    common = [f"experiment=metaworld_{name}", f"data.demos={demos}", f"seed={seed}", f"trainer.max_steps={steps}"]
    common += [f"data.steps_per_epoch={steps}", *QUIET]
    keep = [o for o in common if not o.startswith("callbacks.last_checkpoint")]  # the flow policy's run
    digest = hashlib.sha256(json.dumps(keep).encode()).hexdigest()[:8]  # another configuration, another teacher
    teacher_ckpt = teacher_dir / f"{task}-{demos}-{seed}-{steps}-{digest}" / "checkpoints" / "last.ckpt"
    began = time.perf_counter()
    teacher = None
    finished = teacher_ckpt.exists() and torch.load(teacher_ckpt, weights_only=False)["global_step"] == steps
    if method in ("flow", "student") and not finished:  # trained (or resumed: a run dir resumes), last.ckpt kept
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module, dm, _, _, train_s = fit(compose(keep, teacher_ckpt.parents[1]))
        if method == "flow":
            out = evaluate(module.model, dm, episodes)
            out["train_s"], out["minutes"], out["dm"] = train_s, (time.perf_counter() - began) / 60, dm
            return out
    if method == "flow":  # trained before, for a student: evaluated from its checkpoint
        model, dm, _ = load_checkpoint(teacher_ckpt)
        out = evaluate(model, dm, episodes)
        out["train_s"], out["minutes"], out["dm"] = float("nan"), (time.perf_counter() - began) / 60, dm
        return out
    if method == "student":
        teacher_model, teacher_dm, _ = load_checkpoint(teacher_ckpt)
        teacher = evaluate(teacher_model, teacher_dm, episodes)
        common = [*common, f"teacher={teacher_ckpt}", f"stage.cache_dir={teacher_ckpt.parents[1]}/pairs"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        module, dm, _, _, train_s = fit(compose([*common, *METHODS[method]]))
    out = evaluate(module.model, dm, episodes)
    out["train_s"], out["minutes"] = train_s, (time.perf_counter() - began) / 60
    if teacher is not None:
        out["teacher_success_rate"], out["teacher_ms_per_chunk"] = teacher["success_rate"], teacher["ms_per_chunk"]
    out["dm"] = dm
    return out


def summary_rows(records: list[dict]) -> list[list[str]]:
    """One row per task, demonstrations and method: success mean ± sd over seeds, the expert, ms, minutes."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["demos"], r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    for (task, demos, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        rates = [r["success_rate"] for r in rs]
        label = method
        if method == "student":
            label = (
                f"one-step student (its teacher {100 * statistics.mean(r['teacher_success_rate'] for r in rs):.0f}%, "
                f"{statistics.median(r['teacher_ms_per_chunk'] for r in rs):.1f} ms)"
            )
        rows.append(
            [
                f"{task}-v3",
                str(demos),
                label,
                f"{100 * statistics.mean(rates):.0f} ± {100 * statistics.stdev(rates):.0f} (n={len(rates)})"
                if len(rates) > 1
                else f"{100 * rates[0]:.0f} (n=1)",
                f"{100 * statistics.mean(r['expert'] for r in rs):.0f}",
                f"{statistics.median(r['ms_per_chunk'] for r in rs):.1f}",
                f"{sum(r['minutes'] for r in rs):.1f}",
            ]
        )
    return rows


def wide_table(records: list[dict]) -> str:
    """Task rows, method columns, for each number of demonstrations: success % mean ± sd over seeds (the issue's
    table), then each method's mean over tasks, and the issue's targets checked on the seed means."""
    cells: dict[tuple, list[float]] = {}
    experts: dict[tuple, dict[int, float]] = {}  # the expert on each seed's evaluation starts
    for r in records:
        cells.setdefault((r["demos"], r["task"], r["method"]), []).append(100 * r["success_rate"])
        experts.setdefault((r["demos"], r["task"]), {})[r["seed"]] = r["expert"]
    teachers: dict[tuple, list[float]] = {}
    speed: dict[tuple, list[float]] = {}
    for r in records:
        if r["method"] == "student":
            teachers.setdefault((r["demos"], r["task"]), []).append(100 * r["teacher_success_rate"])
            speed.setdefault((r["demos"], r["task"]), []).append(r["teacher_ms_per_chunk"] / r["ms_per_chunk"])

    def cell(values: list[float]) -> str:
        if not values:
            return ""
        sd = f" ± {statistics.stdev(values):.0f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.0f}{sd}"

    out = []
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for demos in sorted({r["demos"] for r in records}, reverse=True):
        seeds = sorted({r["seed"] for r in records if r["demos"] == demos})
        head = ["task", *METHODS, "student's teacher", "student speed-up", "expert"]
        rows = []
        for task in tasks:
            row = [f"{task}-v3", *(cell(cells.get((demos, task, m), [])) for m in METHODS)]
            ratios = speed.get((demos, task), [])
            row += [cell(teachers.get((demos, task), [])), f"{min(ratios):.1f}x" if ratios else ""]
            rows.append([*row, f"{100 * statistics.mean(experts[(demos, task)].values()):.0f}"])
        means = [
            f"**{statistics.mean(statistics.mean(cells[(demos, t, m)]) for t in tasks):.1f}**"
            if all((demos, t, m) in cells for t in tasks)
            else ""
            for m in METHODS
        ]
        expert = statistics.mean(statistics.mean(experts[(demos, t)].values()) for t in tasks)
        rows.append(["**mean**", *means, "", "", f"**{100 * expert:.1f}**"])
        title = f"{demos} demonstrations, seeds {seeds} (n per cell in policies.md):"
        out.append(f"{title}\n\n{markdown_table(head, rows)}")
    return "\n\n".join(out)


def timing(teachers: Path, episodes: int) -> str:
    """ms per chunk on quiet cores: each kept flow policy's network, its 10 Euler steps against one evaluation (what
    its one-step student, the same network, costs), ``episodes`` chunks per re-plan, medians of 7 after a warm-up;
    the runs' own timings shared the cores with whatever else ran. Writes ``policies_timing.{json,md}``."""
    rows, records = [], []
    for ckpt in sorted(teachers.glob("*/checkpoints/last.ckpt")):
        model, dm, _ = load_checkpoint(ckpt)
        ten = chunk_ms(model, dm, episodes)
        one_step = model.sampler.with_steps(1)
        context = dm.contexts[:episodes]
        one = median_ms(lambda: model.sample(len(context), one_step, y=context))  # noqa: B023
        records.append({"run": ckpt.parents[1].name, "ms_10_steps": ten, "ms_1_step": one, "speed_up": ten / one})
        rows.append([ckpt.parents[1].name, f"{ten:.2f}", f"{one:.2f}", f"{ten / one:.1f}x"])
    save_json("policies_timing", {"episodes": episodes, "runs": records})
    table = markdown_table(["teacher run (task-demos-seed-steps)", "10 Euler steps ms", "1 step ms", "ratio"], rows)
    (RESULTS / "policies_timing.md").write_text(table + "\n")
    return table


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--demos", nargs="+", type=int, default=[10, 50])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--fresh", action="store_true", help="forget the runs already in docs/bench/policies.json")
    p.add_argument("--teachers", type=Path, default=Path.home() / ".cache" / "flowdiff" / "bench-policy-teachers")
    p.add_argument("--timing", action="store_true", help="only time the kept flow policies, 10 steps against 1")
    p.add_argument("--experts", action="store_true", help="only give kept runs their own seed's expert rate")
    args = p.parse_args(argv)
    if args.timing:
        return timing(args.teachers, args.episodes)
    path = RESULTS / "policies.json"
    records = [] if args.fresh or not path.exists() else json.loads(path.read_text())["runs"]
    if args.experts:
        fix_experts(records, args.episodes)
        save_json("policies", {**json.loads(path.read_text()), "runs": records})
        return tables(records, args.steps, args.episodes)
    done = {(r["task"], r["method"], r["demos"], r["seed"], r["steps"], r["episodes"]) for r in records}
    todo = [
        (task, demos, seed, method)  # the most demonstrations first, then seed by seed
        for demos in sorted(args.demos, reverse=True)
        for seed in args.seeds
        for task in args.tasks
        for method in args.methods
        if (task, method, demos, seed, args.steps, args.episodes) not in done
    ]
    print(
        f"{len(todo)} runs of {args.steps} steps and {args.episodes} episodes to do ({len(done)} kept from {path}): "
        f"about {2 * len(todo)} minutes on 2 CPU cores"
    )
    experts = {(r["task"], r["seed"]): r["expert"] for r in records if r.get("expert_starts") == "own seed"}
    for task, demos, seed, method in todo:
        r = run(task, method, demos, seed, args.steps, args.episodes, args.teachers)
        dm = r.pop("dm")
        if (task, seed) not in experts:  # the expert on this seed's evaluation starts (every method's)
            experts[(task, seed)] = expert_rate(dm, args.episodes)
        if method == "flow" and demos == max(args.demos) and seed == args.seeds[0] and task == args.tasks[0]:
            title = f"flow policy, {task}-v3: {r['success_rate']:.0%} of {args.episodes}"
            plot_rollouts(r, RESULTS / "policies_rollouts.png", title)
        records.append(
            {
                "task": task,
                "method": method,
                "demos": demos,
                "seed": seed,
                "steps": args.steps,
                "episodes": args.episodes,
                "expert": experts[(task, seed)],
                "expert_starts": "own seed",
                **{k: float(v) for k, v in r.items() if isinstance(v, (int, float))},
            }
        )
        print(
            f"{task} {method} demos={demos} seed={seed}: success {r['success_rate']:.0%} "
            f"(expert {experts[(task, seed)]:.0%}), {r['ms_per_chunk']:.1f} ms/chunk, {r['minutes']:.1f} min",
            flush=True,
        )
        save_json("policies", {"args": vars(args) | {"teachers": str(args.teachers)}, "runs": records})
    return tables(records, args.steps, args.episodes)


def expert_rate(dm, episodes: int) -> float:
    """The scripted expert's success rate on the evaluation starts the runs of ``dm``'s seed are scored on."""
    return sum(e["success"] for e in run_expert(dm.make_env(episodes, dm.evaluation_seed(1)))) / episodes


def fix_experts(records: list[dict], episodes: int) -> None:
    """Records whose expert rate came from another seed's starts get their own seed's (one expert rollout each)."""
    from flowdiff.build import build_datamodule

    rates: dict[tuple, float] = {}
    for r in records:
        if r.get("expert_starts") == "own seed":
            continue
        key = (r["task"], r["seed"])
        if key not in rates:
            overrides = [f"experiment=metaworld_{r['task'].replace('-', '_')}", f"data.demos={r['demos']}"]
            with contextlib.redirect_stdout(io.StringIO()):
                dm = build_datamodule(compose([*overrides, f"seed={r['seed']}"]))
            rates[key] = expert_rate(dm, episodes)
            print(f"expert, {r['task']} seed {r['seed']}: {rates[key]:.0%}", flush=True)
        r["expert"], r["expert_starts"] = rates[key], "own seed"


def tables(records: list[dict], steps: int, episodes: int) -> str:
    """The issue's table and the per-run rows of the records with ``steps`` and ``episodes``; writes policies.md."""
    records = [r for r in records if r["steps"] == steps and r["episodes"] == episodes]
    head = ["task", "demos", "method", f"success % (mean ± sd over seeds, {episodes} episodes each)", "expert %"]
    table = markdown_table([*head, "ms per chunk", "CPU minutes"], summary_rows(records))
    per_run = "Each run (a student's minutes leave out its teacher's training, which is the flow row's):"
    table = f"{wide_table(records)}\n\n{per_run}\n\n{table}"
    (RESULTS / "policies.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    print(main())
