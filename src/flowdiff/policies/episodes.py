"""Recording episodes: a policy stepped in an environment of episodes side by side, cut into demonstrations."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def record_episodes(env, act: Callable[[Tensor], Tensor]) -> list[dict[str, Tensor]]:
    """``act(obs (n, O)) -> actions (n, A)`` (what the environment executes) from ``env``'s starts until every
    episode is done; episodes ``{"obs": (T + 1, O), "actions": (T, A), "success": bool}``, each cut at its first
    success."""
    obs, actions = [env.reset()], []
    while not bool(env.done.all()):
        a = act(obs[-1])
        actions.append(a)
        obs.append(env.step(a))
    obs_t, act_t = torch.stack(obs, 1), torch.stack(actions, 1)  # (n, T + 1, O), (n, T, A)
    episodes = []
    for i in range(env.n):
        end = int(env.steps_to_success[i]) if env.success[i] else env.steps
        episodes.append({"obs": obs_t[i, : end + 1], "actions": act_t[i, :end], "success": bool(env.success[i])})
    return episodes
