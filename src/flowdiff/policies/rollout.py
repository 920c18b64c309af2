"""Rolling a policy out: episodes side by side, receding horizon (``n_action_steps`` of each generated chunk
executed, then a new chunk from the new observations), one batch of network evaluations per re-plan."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import lightning as L
import torch

from flowdiff.callbacks.periodic import EveryNEpochs


@torch.no_grad()
def rollout(
    model,
    dm,
    n_episodes: int,
    seed: int,
    sampler=None,
    n_action_steps: int | None = None,
    guidance_scale: float | None = None,
) -> dict:
    """Run ``n_episodes`` of ``dm``'s environment from the starts of ``seed`` with ``model`` (a ``FlowModel``)
    generating action chunks conditioned on the normalised observation history. Returns the success rate, the mean
    steps to success, ms per chunk (network alone and wall), the NFE per chunk, and the episodes' paths."""
    steps = n_action_steps or dm.n_action_steps
    env = dm.make_env(n_episodes, seed)
    obs = env.reset()
    history = deque([obs] * dm.obs_horizon, maxlen=dm.obs_horizon)
    chunks, net_s, nfe = 0, 0.0, 0
    g = torch.Generator().manual_seed(seed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    began = time.perf_counter()
    while not bool(env.done.all()):
        context = dm.normaliser.context(torch.stack(list(history), 1)).to(model.device)
        sync()
        start = time.perf_counter()
        result = model.sample(n_episodes, sampler, y=context, guidance_scale=guidance_scale, generator=g)
        sync()
        net_s += time.perf_counter() - start
        nfe = result.nfe
        actions = dm.normaliser.actions_out(result.x)  # (E, horizon, A)
        for j in range(min(steps, actions.shape[1])):
            obs = env.step(actions[:, j])
            history.append(obs)
            if bool(env.done.all()):
                break
        chunks += 1
    wall = time.perf_counter() - began
    won = env.steps_to_success[env.success]
    per_task = {}
    for k, task in enumerate(getattr(env, "tasks", [])):  # Meta-World: each task's own rate
        members = torch.tensor([t == k for t in env.task_of])
        if members.any():  # fewer episodes than tasks leave some out
            per_task[task] = float(env.success[members].float().mean())
    return {
        "success_rate": float(env.success.float().mean()),
        "steps_to_success": float(won.float().mean()) if len(won) else float("nan"),
        "ms_per_chunk": 1000 * net_s / max(chunks, 1),
        "wall_ms_per_chunk": 1000 * wall / max(chunks, 1),
        "nfe": nfe,
        "paths": torch.stack(env.path, 1),  # (E, steps + 1, 2 or 3): the agent's or the hand's positions
        "success": env.success.clone(),
        "per_task": per_task,
        "env": env,  # its layout, for the plot
    }


def plot_rollouts(result: dict, path: Path, title: str = "") -> Path:
    """The episodes' paths (x, y), successful ones green and failed ones red, over the environment's layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    result["env"].draw_layout(ax)
    for p, ok in zip(result["paths"], result["success"]):
        ax.plot(p[:, 0], p[:, 1], color="tab:green" if ok else "tab:red", alpha=0.5, lw=1)
        ax.plot(p[0, 0], p[0, 1], marker="o", color="0.3", markersize=2)
    ax.set_aspect("equal")
    ax.set_title(title or f"success {result['success_rate']:.0%}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


class PolicyRollout(EveryNEpochs):
    """At each validation round, ``n_episodes`` rollouts from seeded starts disjoint from the demonstrations; logs
    ``val/success_rate``, ``val/steps_to_success``, ``val/ms_per_chunk`` (network), ``val/wall_ms_per_chunk`` and
    ``val/nfe``, and draws the paths (``plots/rollouts_step<N>.png``)."""

    data_kinds = ("policy",)
    monitors = {"val/success_rate": "max", "val/steps_to_success": "min"}

    def __init__(self, n_episodes: int = 50, n_action_steps: int | None = None, every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.n_episodes, self.n_action_steps = n_episodes, n_action_steps
        self.last_path: Path | None = None
        self.last: dict | None = None
        self.said_no_video = False

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        dm = trainer.datamodule
        result = rollout(pl_module.model, dm, self.n_episodes, dm.evaluation_seed(), n_action_steps=self.n_action_steps)
        self.last = result
        for key in ("success_rate", "steps_to_success", "ms_per_chunk", "wall_ms_per_chunk", "nfe"):
            pl_module.log(f"val/{key}", float(result[key]), prog_bar=key == "success_rate")
        if len(result["per_task"]) > 1:
            for task, rate in result["per_task"].items():
                pl_module.log(f"val/success_rate/{task}", rate)
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            name = f"rollouts_step{trainer.global_step:07d}.png"
            title = f"step {trainer.global_step}: success {result['success_rate']:.0%} of {self.n_episodes}"
            self.last_path = plot_rollouts(result, run_dir / "plots" / name, title)
            why = getattr(result["env"], "no_video", None)
            if why and not self.said_no_video:
                print(f"rollout video skipped: {why}; the plot draws the paths")
                self.said_no_video = True
