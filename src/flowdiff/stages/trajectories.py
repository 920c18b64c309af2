"""A teacher's ODE trajectories on a coarse time grid, drawn once and stored: what reflow and distillation train on.

A trained model maps each noise ``x0`` to a sample through its ODE. :func:`make_trajectories` keeps the states at
``k + 1`` times ``t_0 = 0 < t_1 < ... < t_k = 1`` of that solve: ``k = 1`` gives the reflow pairs
``(x0, Phi(x0))`` (Liu et al. 2023), ``k > 1`` the targets of a ``k``-step student (each student step from
``x_{t_i}`` must land on the teacher's ``x_{t_{i+1}}``; with the teacher's own ``2k``-step sampler this is
progressive distillation, Salimans & Ho 2022). :func:`load_or_make_trajectories` stores them under a key of
everything that makes them, so repeated runs reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from flowdiff.data.pairs import PairsDataModule
from flowdiff.errors import ConfigError, check_setting
from flowdiff.labels import sampling_labels
from flowdiff.samplers import Sampler

log = logging.getLogger("flowdiff")


@torch.no_grad()
def make_trajectories(
    teacher,
    n: int,
    sampler: Sampler,
    steps: int = 1,
    batch_size: int = 5000,
    seed: int = 0,
    contexts: Tensor | None = None,
) -> dict[str, Tensor]:
    """``{"xs": (n, steps + 1, *shape), "times": (steps + 1,), "y": (n,)}``: the teacher's states along its ODE
    from ``n`` noises drawn from ``seed`` (``xs[:, 0]``), at ``steps + 1`` evenly spaced times of its sampling span;
    ``xs[:, -1]`` is its sample (after the sampler's final denoising step, if any). A CFG teacher is conditioned on
    balanced labels, at its trained guidance scale; a policy teacher on ``contexts`` ``(N, C)`` (its data's
    observations), ``n`` rows drawn from them with replacement, returned as ``"c"`` in place of ``"y"``."""
    sampler = sampler.recording(steps)
    g = torch.Generator().manual_seed(seed)
    labels = sampling_labels(n, teacher.num_classes)
    if contexts is not None:
        labels = contexts[torch.randint(len(contexts), (n,), generator=g)]
    xs, ys, times = [], [], None
    for i in range(0, n, batch_size):
        k = min(batch_size, n - i)
        x0 = teacher.draw_source(k, g)
        y = None if labels is None else labels[i : i + k].to(teacher.device)
        out = teacher.sample(k, sampler=sampler, y=y, x0=x0, generator=g, return_trajectory=steps > 1)
        if steps == 1:
            states = [x0, out.x]
            grid = out.times[[0, -1]]
        else:
            span = len(out.times) - 1 - int(out.denoised)  # the solver's own intervals
            idx = [round(j * span / steps) for j in range(steps + 1)]
            states = [out.trajectory[j] for j in idx[:-1]] + [out.x]
            grid = out.times[idx]
            grid[-1] = out.times[-1]
        xs.append(torch.stack([s.cpu() for s in states], 1))
        ys.append(y.cpu() if y is not None else torch.zeros(k, dtype=torch.long))
        times = grid.cpu()
    return {"xs": torch.cat(xs), "times": times, "c" if contexts is not None else "y": torch.cat(ys)}


def trajectories_key(
    teacher_path: str | Path, sampler: Sampler, n: int, steps: int, seed: int, contexts: Tensor | None = None
) -> str:
    """Names stored trajectories by what makes them: the teacher file (path, size, time), its sampler (every
    setting, as its repr lists them), n, the grid, the seed and the contexts (a digest of their values)."""
    path = Path(teacher_path).resolve()
    stat = path.stat()
    what = [str(path), stat.st_size, stat.st_mtime_ns, repr(sampler), n, steps, seed]
    if contexts is not None:
        what.append(hashlib.sha1(contexts.float().contiguous().numpy().tobytes()).hexdigest())
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_or_make_trajectories(
    teacher_path: str | Path,
    teacher,
    sampler: Sampler,
    n: int,
    cache_dir: str | Path,
    steps: int = 1,
    batch_size: int = 5000,
    seed: int = 0,
    contexts: Tensor | None = None,
) -> tuple[dict[str, Tensor], Path]:
    """The stored trajectories for this teacher, sampler, ``n``, grid and ``seed`` (made and saved atomically on
    first use, with the time they took and their size printed)."""
    cache = Path(cache_dir) / f"trajectories-{trajectories_key(teacher_path, sampler, n, steps, seed, contexts)}.pt"
    what = "pairs" if steps == 1 else f"{steps}-step trajectories"
    if cache.is_file():
        stored = torch.load(cache, weights_only=False)
        log.info("reusing %d %s from %s (made in %.1f s)", n, what, cache, stored["meta"]["seconds"])
        return stored["trajectories"], cache
    start = time.perf_counter()
    trajectories = make_trajectories(teacher, n, sampler, steps, batch_size, seed, contexts)
    seconds = time.perf_counter() - start
    meta = {"teacher": str(teacher_path), "sampler": repr(sampler), "n": n, "steps": steps, "seed": seed}
    meta["seconds"] = seconds
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"trajectories": trajectories, "meta": meta}, tmp)
    tmp.replace(cache)
    size_mb = cache.stat().st_size / 2**20
    print(f"teacher {what}: {n} drawn with {sampler!r} in {seconds:.1f} s, stored at {cache} ({size_mb:.1f} MB)")
    return trajectories, cache


class TeacherTrajectories:
    """What reflow and distillation share: they train on ``n_pairs`` of the teacher's ODE trajectories, drawn once
    with ``sampler`` (built with the teacher's path when it needs one) on the stage's grid and stored under
    ``cache_dir``; the run's datamodule then draws its training batches from them (:class:`PairsDataModule`)."""

    def __init__(self, n_pairs: int, sampler, batch_size: int, cache_dir: str) -> None:
        check_setting("n_pairs", n_pairs, lambda v: v >= 1, "at least 1", whole=True)
        check_setting("batch_size", batch_size, lambda v: v >= 1, "at least 1", whole=True)
        self.n_pairs, self.sampler, self.batch_size, self.cache_dir = int(n_pairs), sampler, int(batch_size), cache_dir

    def trajectory_steps(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def teacher_sampler(self, teacher) -> Sampler:
        """The sampler that draws the trajectories (the stage's, built with the teacher's path if it needs one)."""
        return self.sampler(path=teacher.model.path) if isinstance(self.sampler, functools.partial) else self.sampler

    def datamodule(self, datamodule):
        teacher, steps = self.teacher, self.trajectory_steps()
        datamodule = super().datamodule(datamodule)  # a policy: contexts in the teacher's units
        try:  # a sampler whose grid misses the student's times: one sentence now, not when training starts
            sampler = self.teacher_sampler(teacher).recording(steps)
        except ValueError as err:
            raise ConfigError(f"stage={self.name}: {err}") from None

        def make() -> dict[str, Tensor]:
            trajectories, _ = load_or_make_trajectories(
                teacher.path,
                teacher.model,
                sampler,
                self.n_pairs,
                self.cache_dir,
                steps,
                self.batch_size,
                datamodule.seed,
                getattr(datamodule, "contexts", None),  # a policy's observations
            )
            return trajectories

        steps_per_epoch = getattr(datamodule, "steps_per_epoch", None)
        return PairsDataModule(datamodule, make, datamodule.batch_size, steps_per_epoch, datamodule.seed)
