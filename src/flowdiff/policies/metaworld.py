"""Meta-World (v3 tasks of ``metaworld`` 3.1.1 on MuJoCo 3.3.0): state-based manipulation with a Sawyer arm, its
scripted experts' demonstrations (cached on disk) and episodes stepped side by side for rollouts.

An observation is Meta-World's 39-d state (hand position, gripper opening, two objects' poses, the same of the
previous frame, the goal), followed by a one-hot of the task when several are trained together; an action is 4-d
(the hand's displacement and the gripper's effort, in [-1, 1]).

Starts: episode ``i`` of a seed begins from Meta-World's own task ``i mod 50`` (goal and object placement) of the
benchmark ``MT1(task, seed=stream_seed("metaworld starts", seed, i // 50))``, so demonstrations and evaluations,
which use different seeds, start from disjoint placements. Environments are built from the benchmark's class and
``set_task`` (Meta-World's README) rather than ``gymnasium.make("Meta-World/MT1", ...)``, which builds the 50-task
benchmark again for every environment (1.5 s each); built environments are kept and reused (``set_task`` and
``reset`` restore every state).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowdiff.errors import ConfigError
from flowdiff.policies.episodes import record_episodes
from flowdiff.seeds import stream_seed

INSTALL = "pip install -e '.[robot]'"
CACHE = Path("~/.cache/flowdiff/demos").expanduser()
TASKS_PER_BENCHMARK = 50  # Meta-World's goals per MT1 benchmark
STATE_DIM, ACTION_DIM = 39, 4
FORMAT = 1  # of the cached demonstrations: bump when what is recorded changes
WAVE = 50  # demonstrations generated side by side, per task


def require_metaworld():
    """``metaworld``, or one sentence saying how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import metaworld
            import metaworld.policies  # noqa: F401
    except ImportError as err:
        raise ConfigError(
            f"data=metaworld needs Meta-World and MuJoCo, which are not installed ({err}): {INSTALL}"
        ) from None
    return metaworld


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("metaworld", "mujoco")}


def check_tasks(tasks: list[str]) -> None:
    mw = require_metaworld()
    known = mw.MT1.ENV_NAMES
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ConfigError(f"data.task={unknown[0]} is not a Meta-World v3 task; some are: {', '.join(known[:8])}, ...")


@functools.lru_cache(maxsize=256)
def _benchmark(task: str, seed: int):
    mw = require_metaworld()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mw.MT1(task, seed=seed)


def start(task: str, seed: int, i: int):
    """Meta-World's task (a goal and an object placement) of episode ``i`` of ``seed``'s starts."""
    return _benchmark(task, stream_seed("metaworld starts", seed, i // TASKS_PER_BENCHMARK) % 2**31).train_tasks[
        i % TASKS_PER_BENCHMARK
    ]


_POOL: dict[str, list] = {}  # built environments by task, reused across rollouts


def _environments(task: str, n: int) -> list:
    pool = _POOL.setdefault(task, [])
    while len(pool) < n:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool.append(_benchmark(task, 0).train_classes[task]())
    return pool[:n]


class MetaWorldEpisodes:
    """``n`` episodes side by side, episode ``i`` of task ``tasks[(first + i) % len(tasks)]``.
    ``reset() -> obs (n, O)``; ``step(actions (n, 4)) -> obs``; ``success``, ``done`` and ``steps_to_success`` are
    ``(n,)``; ``path`` the hand's positions, a list of ``(n, 3)``. An episode ends at its first success or after
    ``max_steps`` steps. Episode ``i`` is episode ``first + i`` of a longer set (a DDP rank's share, a wave of
    demonstrations): the task and the start are that one's. Simulators are shared with later episode sets (a
    pool): the last set reset owns them, and stepping an earlier one is an error."""

    # MuJoCo renders offscreen only with an OpenGL context (EGL or OSMesa), which these machines lack (measured)
    no_video = "flowdiff does not record MuJoCo videos (offscreen rendering needs an EGL or OSMesa context)"

    def __init__(self, tasks: list[str], n: int, seed: int, max_steps: int = 500, first: int = 0) -> None:
        require_metaworld()
        self.tasks, self.n, self.seed, self.first = list(tasks), n, seed, first
        self.max_steps = max_steps
        self.task_of = [(first + i) % len(self.tasks) for i in range(n)]
        self.envs: list = [None] * n
        for k, task in enumerate(self.tasks):
            members = [i for i in range(n) if self.task_of[i] == k]
            for env, i in zip(_environments(task, len(members)), members):
                self.envs[i] = env
        for env in self.envs:
            if max_steps > env.max_path_length:
                raise ConfigError(f"data.max_steps={max_steps} is over Meta-World's {env.max_path_length} steps")

    def _observe(self, states: np.ndarray) -> Tensor:
        obs = torch.as_tensor(states, dtype=torch.float32)
        if len(self.tasks) > 1:
            obs = torch.cat([obs, torch.nn.functional.one_hot(torch.tensor(self.task_of), len(self.tasks))], 1)
        return obs

    def reset(self) -> Tensor:
        states = []
        for i, env in enumerate(self.envs):
            k = self.task_of[i]
            env.set_task(start(self.tasks[k], self.seed, (self.first + i) // len(self.tasks)))
            state, _ = env.reset()
            env.flowdiff_owner = self
            states.append(state)
        self.states = np.stack(states)  # (n, 39): what the experts read
        self.steps = 0
        self.success = torch.zeros(self.n, dtype=torch.bool)
        self.steps_to_success = torch.full((self.n,), -1)
        self.goals = torch.as_tensor(self.states[:, -3:], dtype=torch.float32)
        self.path = [torch.as_tensor(self.states[:, :3], dtype=torch.float32)]
        return self._observe(self.states)

    @property
    def done(self) -> Tensor:
        return self.success | torch.tensor(self.steps >= self.max_steps)

    def step(self, actions: Tensor) -> Tensor:
        a = actions.detach().float().cpu().clamp(-1, 1).numpy()
        self.steps += 1
        for i, env in enumerate(self.envs):
            if self.success[i] or self.steps > self.max_steps:
                continue  # an ended episode holds still
            if env.flowdiff_owner is not self:
                raise RuntimeError("these simulators were reset by a later episode set: step one set at a time")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state, _, _, _, info = env.step(a[i])
            self.states[i] = state
            if info["success"] > 0:
                self.success[i] = True
                self.steps_to_success[i] = self.steps
        self.path.append(torch.as_tensor(self.states[:, :3], dtype=torch.float32))
        return self._observe(self.states)

    def expert_actions(self) -> Tensor:
        """The scripted experts' actions ``(n, 4)`` for the current states (``metaworld.policies.ENV_POLICY_MAP``),
        clipped to what the environment executes."""
        experts = _experts(tuple(self.tasks))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = np.stack([experts[self.task_of[i]].get_action(s) for i, s in enumerate(self.states)])
        return torch.as_tensor(np.clip(a, -1, 1), dtype=torch.float32)

    def draw_layout(self, ax) -> None:
        """Top view (x, y) of the table: the goals as stars, the hand's starts as dots."""
        ax.plot(self.goals[:, 0], self.goals[:, 1], "k*", markersize=7, linestyle="none", label="goal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")


@functools.lru_cache(maxsize=16)
def _experts(tasks: tuple[str, ...]) -> list:
    from metaworld.policies import ENV_POLICY_MAP

    return [ENV_POLICY_MAP[t]() for t in tasks]


def run_expert(env: MetaWorldEpisodes) -> list[dict[str, Tensor]]:
    """The experts' episodes ``{"obs": (T + 1, O), "actions": (T, 4), "success": bool}`` from ``env``'s starts, each
    ending at its first success."""
    return record_episodes(env, lambda obs: env.expert_actions())


def demonstrations(
    tasks: list[str], n: int, seed: int, max_steps: int = 500, cache_dir: str | Path | None = None
) -> list[dict[str, Tensor]]:
    """``n`` expert episodes per task (round robin over ``tasks``) from ``seed``'s starts, generated once and read
    back from ``cache_dir`` (default ``~/.cache/flowdiff/demos``) under a key of the tasks, ``n``, ``seed``,
    ``max_steps`` and the package versions."""
    check_tasks(tasks)
    key = {"tasks": list(tasks), "n": n, "seed": seed, "max_steps": max_steps, "format": FORMAT, **versions()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = "+".join(tasks) if len(tasks) <= 3 else f"{len(tasks)}tasks"
    path = Path(cache_dir).expanduser() if cache_dir else CACHE
    path = path / f"metaworld-{name}-n{n}-seed{seed}-{digest}.pt"
    stored = None
    if path.exists():
        began = time.perf_counter()
        try:
            stored = torch.load(path, weights_only=True)
        except Exception:  # a damaged file: made again
            stored = None
        if stored is not None and stored["key"] == key:
            print(
                f"demonstrations: {len(stored['episodes'])} episodes read from {path} "
                f"({time.perf_counter() - began:.2f} s)"
            )
            return stored["episodes"]
    began = time.perf_counter()
    episodes = []
    for first in range(0, n, WAVE):  # at most WAVE simulators per task at a time (about 24 MB each)
        m = min(WAVE, n - first)
        episodes += run_expert(MetaWorldEpisodes(tasks, m * len(tasks), seed, max_steps, first * len(tasks)))
    seconds = time.perf_counter() - began
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")  # one per writer
    torch.save({"key": key, "episodes": episodes}, partial)
    partial.replace(path)  # atomic: a reader never sees half a file, concurrent writers leave one whole file
    rate = sum(ep["success"] for ep in episodes) / len(episodes)
    steps = sum(len(ep["actions"]) for ep in episodes)
    print(
        f"demonstrations: {len(episodes)} episodes of {', '.join(tasks)} ({steps} steps, expert success {rate:.0%}) "
        f"generated in {seconds:.1f} s, cached at {path} ({path.stat().st_size / 1e6:.1f} MB)"
    )
    return episodes
