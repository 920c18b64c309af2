"""Demonstrations as training data: chunks of ``horizon`` future actions (the generated ``x``, ``(horizon, A)``)
conditioned on ``obs_horizon`` past observations (the context ``c``), normalised per dimension.

Batches are ``{"x1": (B, horizon, A), "c": (B, obs_horizon * O)}``, drawn fresh each step from the chunks on the
counter-based stream of :class:`~flowdiff.data.datamodule.FreshBatchStream` (exact resume). The normalisation
statistics come from the demonstrations, which are rebuilt from the same seed when a checkpoint is read back, so
rollouts apply what training used.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from flowdiff.data.datamodule import FreshBatchStream
from flowdiff.seeds import stream_seed


def chunks_of(
    episodes: list[dict[str, Tensor]], horizon: int, obs_horizon: int, pad_with_last: bool = False
) -> tuple[Tensor, Tensor]:
    """Every step ``k`` of every episode: the observations ``k - obs_horizon + 1 .. k`` (the first repeated before
    the start) ``(N, obs_horizon, O)`` and the actions ``k .. k + horizon - 1`` ``(N, horizon, A)``, after the end
    zero (holding still) or, ``pad_with_last``, the last action repeated (Diffusion Policy's padding: a closed
    gripper stays closed)."""
    obs, acts = [], []
    for ep in episodes:
        o, a = ep["obs"], ep["actions"]
        T = len(a)
        for k in range(T):
            past = [o[max(0, k - j)] for j in reversed(range(obs_horizon))]
            chunk = a[k : k + horizon]
            if len(chunk) < horizon:
                pad = (
                    a[-1:].expand(horizon - len(chunk), -1)
                    if pad_with_last
                    else torch.zeros(horizon - len(chunk), a.shape[1])
                )
                chunk = torch.cat([chunk, pad])
            obs.append(torch.stack(past))
            acts.append(chunk)
    return torch.stack(obs), torch.stack(acts)


class Normaliser:
    """Per-dimension ``(v - mean) / std`` of observations and actions, from the demonstrations."""

    def __init__(self, obs: Tensor, actions: Tensor) -> None:
        self.obs_mean, self.obs_std = obs.flatten(0, -2).mean(0), obs.flatten(0, -2).std(0).clamp_min(1e-3)
        self.act_mean, self.act_std = actions.flatten(0, -2).mean(0), actions.flatten(0, -2).std(0).clamp_min(1e-3)

    def context(self, obs: Tensor) -> Tensor:
        """``(B, obs_horizon, O)`` observations -> ``(B, obs_horizon * O)`` normalised context."""
        return ((obs - self.obs_mean) / self.obs_std).flatten(1)

    def actions_in(self, actions: Tensor) -> Tensor:
        return (actions - self.act_mean) / self.act_std

    def actions_out(self, x: Tensor) -> Tensor:
        """Generated chunks ``(B, horizon, A)`` back in the environment's units."""
        return x.cpu() * self.act_std + self.act_mean

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in ("obs_mean", "obs_std", "act_mean", "act_std")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            setattr(self, k, v.cpu())


class PolicyDataModule(FreshBatchStream):
    """Action chunks from ``demos`` demonstrations of a subclass's expert (:meth:`demonstrations`), its environment
    for rollouts (:meth:`make_env`). Demonstrations and evaluation episodes start from disjoint seeds."""

    kind = "policy"
    gaussian_source = True
    source_name = "gaussian"
    num_classes = 0
    pad_with_last_action = False  # chunks past an episode's end: zeros (holding still) or the last action

    def __init__(
        self,
        demos: int = 100,
        horizon: int = 8,
        obs_horizon: int = 1,
        n_action_steps: int = 4,
        batch_size: int = 256,
        steps_per_epoch: int = 1000,
        n_val: int = 512,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.demos, self.horizon, self.obs_horizon, self.n_action_steps = demos, horizon, obs_horizon, n_action_steps
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.episodes = self.demonstrations(demos, stream_seed("demonstrations", seed) % 2**31)
        self.raw = chunks_of(self.episodes, horizon, obs_horizon, self.pad_with_last_action)  # observations, actions
        self.normaliser = Normaliser(*self.raw)
        g = torch.Generator().manual_seed(stream_seed("policy val set", seed) % 2**31)
        self.val_index = torch.randperm(len(self.raw[1]), generator=g)[:n_val]
        self.normalise()

    def normalise(self) -> None:
        """The training chunks and contexts and the validation set, in the normaliser's units."""
        self.contexts = self.normaliser.context(self.raw[0])  # (N, obs_horizon * O)
        self.chunks = self.normaliser.actions_in(self.raw[1])  # (N, horizon, A)
        self.val_set = {"x1": self.chunks[self.val_index], "c": self.contexts[self.val_index]}

    # ------------------------------------------------------------------ subclasses
    def demonstrations(self, n: int, seed: int) -> list[dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def make_env(self, n: int, seed: int, first: int = 0):  # pragma: no cover
        """Episodes ``first .. first + n - 1`` of the evaluation starts of ``seed``, side by side."""
        raise NotImplementedError

    # ------------------------------------------------------------------ what the model needs to know
    @property
    def data_shape(self) -> tuple[int, int]:
        return tuple(self.chunks.shape[1:])

    @property
    def context_dim(self) -> int:
        return self.contexts.shape[1]

    @property
    def expert_success_rate(self) -> float:
        return sum(ep["success"] for ep in self.episodes) / max(len(self.episodes), 1)

    def evaluation_seed(self, index: int = 0) -> int:
        """The seed of evaluation round ``index``'s starts: never a demonstration's."""
        return stream_seed("policy evaluation", self.seed, index) % 2**31

    # ------------------------------------------------------------------ batches
    def draw(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        idx = torch.randint(len(self.chunks), (n,), generator=generator)
        return {"x1": self.chunks[idx], "c": self.contexts[idx]}

    def val_dataloader(self) -> DataLoader:
        n, b = len(self.val_set["x1"]), self.batch_size
        batches = [{k: v[i : i + b] for k, v in self.val_set.items()} for i in range(0, n, b)]
        return DataLoader(batches, batch_size=None, num_workers=0, generator=torch.Generator())

    def state_dict(self) -> dict:
        """The stream position and the normalisation statistics (rollouts of a checkpoint apply what training used)."""
        return {**super().state_dict(), "normaliser": self.normaliser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "normaliser" in state:  # the checkpoint's statistics for everything: a resumed run trains in its units
            self.normaliser.load_state_dict(state["normaliser"])
            self.normalise()

    def data_moments(self, n: int = 10_000) -> tuple[Tensor, Tensor]:
        return self.chunks.mean(0), self.chunks.var(0)


class ObstacleDataModule(PolicyDataModule):
    """``data=obstacle``: the planar reach round a disc (:mod:`flowdiff.policies.obstacle`), its scripted expert's
    demonstrations (left or right, a fair coin); ``env`` holds :class:`ObstacleReach`'s settings (in the config, so
    a checkpoint rebuilds the same demonstrations and normalisation)."""

    name = "obstacle"

    def __init__(self, env: dict | None = None, **kwargs) -> None:
        self.env = dict(env or {})
        super().__init__(**kwargs)

    def demonstrations(self, n: int, seed: int) -> list[dict[str, Tensor]]:
        from flowdiff.policies.obstacle import expert_demonstrations

        return expert_demonstrations(n, seed, **self.env)

    def make_env(self, n: int, seed: int, first: int = 0):
        from flowdiff.policies.obstacle import ObstacleReach

        return ObstacleReach(n, seed, **self.env, first=first)


class MetaWorldDataModule(PolicyDataModule):
    """``data=metaworld data.task=push-v3``: Meta-World's scripted experts' demonstrations (``demos`` episodes per
    task, cached on disk) and its simulator for rollouts (:mod:`flowdiff.policies.metaworld`); a list of tasks
    trains one multi-task policy, the task's one-hot then part of the observation and so of the context."""

    name = "metaworld"
    pad_with_last_action = True

    def __init__(
        self, task: str | list[str] = "reach-v3", max_steps: int = 500, cache_dir: str | None = None, **kwargs
    ) -> None:
        self.tasks = [task] if isinstance(task, str) else list(task)  # checked by demonstrations()
        self.max_steps, self.cache_dir = max_steps, cache_dir
        super().__init__(**kwargs)

    def demonstrations(self, n: int, seed: int) -> list[dict[str, Tensor]]:
        from flowdiff.policies.metaworld import demonstrations

        return demonstrations(self.tasks, n, seed, self.max_steps, self.cache_dir)

    def make_env(self, n: int, seed: int, first: int = 0):
        from flowdiff.policies.metaworld import MetaWorldEpisodes

        return MetaWorldEpisodes(self.tasks, n, seed, self.max_steps, first)
