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

Needs ``pip install -e '.[robot]'``. CPU budget: about 2 minutes per run (2,000 steps of the policy MLP at batch
256 and 50 episodes; a student run, with its teacher, 3-4 minutes) on 2 cores, so the full protocol is about
4 hours.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time

from common import RESULTS, compose, markdown_table, median_ms, save_json

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


def run(task: str, method: str, demos: int, seed: int, steps: int, episodes: int) -> dict:
    name = task.replace("-", "_")
    common = [f"experiment=metaworld_{name}", f"data.demos={demos}", f"seed={seed}", f"trainer.max_steps={steps}"]
    common += [f"data.steps_per_epoch={steps}", *QUIET]
    began = time.perf_counter()
    teacher = None
    if method == "student":  # the flow policy first, with its last checkpoint kept for the stage
        run_dir = tempfile.mkdtemp(prefix="flowdiff-policy-teacher-")
        keep = [o for o in common if not o.startswith("callbacks.checkpoint")]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module, dm, _, _, _ = fit(compose(keep, run_dir))
        teacher = rollout(module.model.eval(), dm, episodes, dm.evaluation_seed(1))
        teacher["ms_per_chunk"] = chunk_ms(module.model, dm, episodes)
        common = [*common, f"teacher={run_dir}/checkpoints/last.ckpt", f"stage.cache_dir={run_dir}/pairs"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        module, dm, _, _, train_s = fit(compose([*common, *METHODS[method]]))
    out = rollout(module.model.eval(), dm, episodes, dm.evaluation_seed(1))
    out["ms_per_chunk"] = chunk_ms(module.model, dm, episodes)  # the rollout's mean holds one-time costs
    out["train_s"], out["minutes"] = train_s, (time.perf_counter() - began) / 60
    if teacher is not None:
        out["teacher_success_rate"], out["teacher_ms_per_chunk"] = teacher["success_rate"], teacher["ms_per_chunk"]
    out["dm"] = dm
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))  # student: with teacher
    p.add_argument("--demos", nargs="+", type=int, default=[10, 50])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--episodes", type=int, default=50)
    args = p.parse_args(argv)
    runs = len(args.tasks) * len(args.methods) * len(args.demos) * len(args.seeds)
    print(f"{runs} runs of {args.steps} steps and {args.episodes} episodes: about {2 * runs} minutes on 2 CPU cores")
    records, rows, experts = [], [], {}
    for task in args.tasks:
        for demos in args.demos:
            for method in args.methods:
                rates, ms, minutes, teachers = [], [], [], []
                for seed in args.seeds:
                    r = run(task, method, demos, seed, args.steps, args.episodes)
                    dm = r.pop("dm")
                    if task not in experts:  # the experts from the first seed's evaluation starts
                        experts[task] = (
                            sum(e["success"] for e in run_expert(dm.make_env(args.episodes, dm.evaluation_seed(1))))
                            / args.episodes
                        )
                    if (
                        method == "flow"
                        and demos == max(args.demos)
                        and seed == args.seeds[0]
                        and task == args.tasks[0]
                    ):
                        plot_rollouts(
                            r,
                            RESULTS / "policies_rollouts.png",
                            f"flow policy, {task}-v3: {r['success_rate']:.0%} of {args.episodes}",
                        )
                    rates.append(r["success_rate"])
                    ms.append(r["ms_per_chunk"])
                    minutes.append(r["minutes"])
                    if "teacher_success_rate" in r:
                        teachers.append((r["teacher_success_rate"], r["teacher_ms_per_chunk"]))
                    records.append(
                        {
                            "task": task,
                            "method": method,
                            "demos": demos,
                            "seed": seed,
                            "expert": experts[task],
                            **{k: float(v) for k, v in r.items() if isinstance(v, (int, float))},
                        }
                    )
                    print(
                        f"{task} {method} demos={demos} seed={seed}: success {r['success_rate']:.0%} "
                        f"(expert {experts[task]:.0%}), {r['ms_per_chunk']:.1f} ms/chunk, {r['minutes']:.1f} min",
                        flush=True,
                    )
                sd = statistics.stdev(rates) if len(rates) > 1 else float("nan")
                rows.append(
                    [
                        f"{task}-v3",
                        str(demos),
                        method
                        if not teachers
                        else f"one-step student (its teacher {100 * statistics.mean(t for t, _ in teachers):.0f}%, "
                        f"{statistics.median(m for _, m in teachers):.1f} ms)",
                        f"{100 * statistics.mean(rates):.0f} ± {100 * sd:.0f}"
                        if len(rates) > 1
                        else f"{100 * rates[0]:.0f}",
                        f"{100 * experts[task]:.0f}",
                        f"{statistics.median(ms):.1f}",
                        f"{sum(minutes):.1f}",
                    ]
                )
                save_json("policies", {"args": vars(args), "runs": records})
    head = [
        "task",
        "demos",
        "method",
        f"success % ({len(args.seeds)} seeds x {args.episodes} episodes)",
        "expert %",
        "ms per chunk",
        "CPU minutes",
    ]
    table = markdown_table(head, rows)
    (RESULTS / "policies.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    print(main())
