"""Rolling a policy out: episodes side by side, receding horizon (``n_action_steps`` of each generated chunk
executed, then a new chunk from the new observations), one batch of network evaluations per re-plan."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import lightning as L
import torch

from flowdiff.callbacks.periodic import EveryNEpochs
from flowdiff.errors import ConfigError
from flowdiff.seeds import stream_seed
from flowdiff.utils import rank_share


@torch.no_grad()
def rollout(
    model,
    dm,
    n_episodes: int,
    seed: int,
    sampler=None,
    n_action_steps: int | None = None,
    guidance_scale: float | None = None,
    share: slice | None = None,
) -> dict:
    """Run ``n_episodes`` of ``dm``'s environment from the starts of ``seed`` with ``model`` (a ``FlowModel``)
    generating action chunks conditioned on the normalised observation history. Returns the success rate, the mean
    steps to success, ms per chunk (network alone and wall), the NFE per chunk, and the episodes' paths.

    ``share`` runs only those of the episodes (a DDP rank's, :func:`flowdiff.utils.rank_share`) and returns them
    unsummarised (:func:`summarise` joins the shares): each re-plan draws the sources of all ``n_episodes`` and
    takes the share's, so an ODE sampler's episodes are the same whatever the number of ranks (up to the rounding
    of another batch size); an SDE sampler's noise comes from a stream of its own per share."""
    whole = share is None
    share = slice(0, n_episodes) if whole else share
    mine = range(n_episodes)[share]
    steps = n_action_steps or dm.n_action_steps
    env = dm.make_env(len(mine), seed, first=mine.start) if len(mine) else None
    chunks, net_s, nfe = 0, 0.0, 0
    g = torch.Generator().manual_seed(seed)  # the sources of all episodes, the same on every rank
    noise = torch.Generator().manual_seed(stream_seed("rollout noise", seed, share.start))  # an SDE's
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    began = time.perf_counter()
    if env is not None:
        obs = env.reset()
        history = deque([obs] * dm.obs_horizon, maxlen=dm.obs_horizon)
    while env is not None and not bool(env.done.all()):
        context = dm.normaliser.context(torch.stack(list(history), 1)).to(model.device)
        x0 = model.draw_source(n_episodes, g)[share]  # (E, horizon, A): the share of every episode's source
        sync()
        start = time.perf_counter()
        result = model.sample(len(mine), sampler, y=context, guidance_scale=guidance_scale, x0=x0, generator=noise)
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
    part = {
        "success": env.success.clone() if env else torch.zeros(0, dtype=torch.bool),
        "steps_to_success": env.steps_to_success.clone() if env else torch.zeros(0, dtype=torch.long),
        "task_of": list(getattr(env, "task_of", [])),
        "tasks": list(getattr(env, "tasks", [])),
        "paths": list(torch.stack(env.path, 1)) if env else [],  # (steps + 1, 2 or 3) each: the agent's or hand's
        "net_s": net_s,
        "wall_s": time.perf_counter() - began,
        "chunks": chunks,
        "nfe": nfe,
        "env": env,
    }
    return summarise([part]) if whole else part


def summarise(parts: list[dict]) -> dict:
    """The episodes of ``parts`` (DDP ranks' shares in rank order, or one whole set) summarised: success rate, mean
    steps to success, each task's rate, ms per chunk (network and wall; the slowest share's, which the others
    wait for), NFE, and each episode's path and success."""
    success = torch.cat([p["success"] for p in parts])
    steps = torch.cat([p["steps_to_success"] for p in parts])
    task_of = [t for p in parts for t in p["task_of"]]
    tasks = next((p["tasks"] for p in parts if p["tasks"]), [])
    won = steps[success]
    per_task = {}
    for k, task in enumerate(tasks):  # Meta-World: each task's own rate
        members = torch.tensor([t == k for t in task_of], dtype=torch.bool)
        if members.any():  # fewer episodes than tasks leave some out
            per_task[task] = float(success[members].float().mean())
    slowest = max(parts, key=lambda p: p["wall_s"])
    paths = [path for p in parts for path in p["paths"]]
    longest = max((len(path) for path in paths), default=0)  # a share stops when its own episodes have ended:
    paths = [torch.cat([path, path[-1:].expand(longest - len(path), -1)]) for path in paths]  # they hold still
    return {
        "success_rate": float(success.float().mean()),
        "steps_to_success": float(won.float().mean()) if len(won) else float("nan"),
        "ms_per_chunk": 1000 * slowest["net_s"] / max(slowest["chunks"], 1),
        "wall_ms_per_chunk": 1000 * slowest["wall_s"] / max(slowest["chunks"], 1),
        "nfe": max(p["nfe"] for p in parts),
        "paths": paths,  # (steps + 1, 2 or 3) each
        "success": success,
        "per_task": per_task,
        "env": next((p["env"] for p in parts if p["env"] is not None), None),  # its layout, for the plot
    }


def gather(part: dict, world: int) -> list[dict]:
    """Every rank's share of a rollout (``world`` processes of ``torch.distributed``), in rank order."""
    if world == 1:
        return [part]
    import torch.distributed as dist

    mine = {k: v for k, v in part.items() if k != "env"}  # simulators stay where they are
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    for p in parts:
        p["env"] = None
    parts[dist.get_rank()]["env"] = part["env"]
    return parts


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
    ``val/nfe``, and draws the paths (``plots/rollouts_step<N>.png``). Under DDP each rank runs its contiguous
    share of the episodes and every rank logs the summary of all of them."""

    data_kinds = ("policy",)
    monitors = {"val/success_rate": "max", "val/steps_to_success": "min"}

    def __init__(self, n_episodes: int = 50, n_action_steps: int | None = None, every_n_epochs: int = 1) -> None:
        super().__init__(every_n_epochs)
        self.n_episodes, self.n_action_steps = n_episodes, n_action_steps
        self.last_path: Path | None = None
        self.last: dict | None = None
        self.said_no_video = False

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.n_episodes < trainer.world_size:
            raise ConfigError(
                f"callbacks.rollout.n_episodes={self.n_episodes} leaves some of the {trainer.world_size} ranks "
                f"without an episode: set it to at least {trainer.world_size}"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        dm, world = trainer.datamodule, trainer.world_size
        share = rank_share(self.n_episodes, trainer.global_rank, world)  # each rank its episodes, then all of them
        part = rollout(
            pl_module.model, dm, self.n_episodes, dm.evaluation_seed(), n_action_steps=self.n_action_steps, share=share
        )
        result = summarise(gather(part, world))
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
