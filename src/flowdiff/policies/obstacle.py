"""A planar reaching task with two ways round an obstacle: the course's lecture-5 argument for generative policies.

A point agent starts near ``(0, -1)`` and must reach the goal ``(0, 1)``; a disc of radius ``radius`` sits at the
origin between them. The scripted expert goes round it on the left or on the right with equal probability, so the
demonstrated action at the start is bimodal: regression onto the mean action heads straight into the disc, while a
generative policy draws one of the two ways and keeps to it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.policies.episodes import record_episodes


class ObstacleReach:
    """``n`` episodes side by side, episodes ``first .. first + n - 1`` of ``seed``'s starts.
    ``reset() -> obs (n, 2)``; ``step(actions (n, 2)) -> obs``; ``success``, ``collided`` and ``done`` are ``(n,)``
    flags; an action is a displacement, clipped to ``max_step`` in norm."""

    observation_dim, action_dim = 2, 2

    def __init__(
        self,
        n: int,
        seed: int,
        radius: float = 0.35,
        max_step: float = 0.1,
        max_steps: int = 60,
        start_noise: float = 0.02,
        goal_tolerance: float = 0.1,
        first: int = 0,
    ) -> None:
        self.n, self.seed, self.first = n, seed, first
        self.radius, self.max_step, self.max_steps = radius, max_step, max_steps
        self.start_noise, self.goal_tolerance = start_noise, goal_tolerance
        self.goal = torch.tensor([0.0, 1.0])

    def draw_layout(self, ax) -> None:
        """The disc and the goal; the plot's extent."""
        import matplotlib.pyplot as plt

        ax.add_patch(plt.Circle((0, 0), self.radius, color="0.6"))
        ax.plot(*self.goal.tolist(), marker="*", color="k", markersize=14, linestyle="none")
        ax.set_xlim(-1.2, 1.2)
        ax.set_ylim(-1.3, 1.3)

    def reset(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        offsets = torch.rand(self.first + self.n, 2, generator=g)[self.first :]  # episodes first .. first + n - 1
        self.pos = torch.tensor([0.0, -1.0]) + self.start_noise * (2 * offsets - 1)
        self.steps = 0
        self.success = torch.zeros(self.n, dtype=torch.bool)
        self.collided = torch.zeros(self.n, dtype=torch.bool)
        self.steps_to_success = torch.full((self.n,), -1)
        self.path = [self.pos.clone()]
        return self.pos.clone()

    @property
    def done(self) -> Tensor:
        return self.success | self.collided | (self.steps >= self.max_steps)

    def step(self, actions: Tensor) -> Tensor:
        a = actions.float().cpu()
        norm = a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        a = a * (self.max_step / norm).clamp(max=1.0)
        active = ~(self.success | self.collided)
        self.pos = torch.where(active[:, None], self.pos + a, self.pos)
        self.steps += 1
        self.collided |= active & (self.pos.norm(dim=1) < self.radius)
        reached = active & ~self.collided & ((self.pos - self.goal).norm(dim=1) < self.goal_tolerance)
        self.steps_to_success = torch.where(
            reached, torch.full_like(self.steps_to_success, self.steps), self.steps_to_success
        )
        self.success |= reached
        self.path.append(self.pos.clone())
        return self.pos.clone()


class ObstacleExpert:
    """The scripted expert: per episode a side ``s = +-1`` (a fair coin from ``seed``), the waypoint ``(s * 0.6, 0)``
    until it is passed, then the goal; each action heads there at full speed."""

    def __init__(self, n: int, seed: int, offset: float = 0.6) -> None:
        g = torch.Generator().manual_seed(seed + 7_777)
        self.side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        self.offset = offset
        self.passed = torch.zeros(n, dtype=torch.bool)

    def __call__(self, pos: Tensor, env: ObstacleReach) -> Tensor:
        waypoint = torch.stack([self.side * self.offset, torch.zeros_like(self.side)], 1)
        self.passed |= (pos - waypoint).norm(dim=1) < env.max_step * 1.5
        self.passed |= pos[:, 1] > 0
        target = torch.where(self.passed[:, None], env.goal.expand_as(pos), waypoint)
        return target - pos


def expert_demonstrations(n: int, seed: int, **env_kwargs) -> list[dict[str, Tensor]]:
    """``n`` expert episodes ``{"obs": (T + 1, 2), "actions": (T, 2), "success": bool}`` from starts of ``seed``."""
    env = ObstacleReach(n, seed, **env_kwargs)
    expert = ObstacleExpert(n, seed)

    def act(pos: Tensor) -> Tensor:
        a = expert(pos, env)
        norm = a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return a * (env.max_step / norm).clamp(max=1.0)  # what the environment executes

    return record_episodes(env, act)
