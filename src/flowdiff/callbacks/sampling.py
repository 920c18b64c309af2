"""Callbacks that decide *when* to sample, score and plot; the math lives in samplers/ and metrics/."""

from __future__ import annotations

import math
import weakref
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from flowdiff.callbacks.periodic import EveryNEpochs
from flowdiff.metrics import mmd, w2
from flowdiff.plotting import plot_samples_2d, plt
from flowdiff.seeds import OFFSETS, rank_seed, seeded
from flowdiff.utils import rank_share


def _run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def _reference(trainer: L.Trainer, n: int) -> dict[str, torch.Tensor]:
    val = trainer.datamodule.val_set
    return {k: v[:n] for k, v in val.items()}


#: module -> (step, samples) of the latest validation round, shared by the callbacks that use them
_ROUND_SAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def validation_samples(trainer: L.Trainer, pl_module, n: int) -> torch.Tensor:
    """``n`` samples for this validation round, drawn once and shared by the callbacks (same seed each time).

    Under DDP each rank samples its contiguous share of the ``n`` starting points (all drawn from one seed, so the
    same points whatever the number of ranks) and the shares are gathered: every rank returns all ``n`` samples.
    Call it on every rank (it is a collective)."""
    cached = _ROUND_SAMPLES.get(pl_module)
    if cached is not None and cached[0] == trainer.global_step and cached[1].shape[0] >= n:
        return cached[1][:n]
    ref = _reference(trainer, n)
    n = len(ref["x1"])
    world, rank = trainer.world_size, trainer.global_rank
    x0 = pl_module.draw_source(n, seeded("validation samples"))
    mine = rank_share(n, rank, world)
    y = pl_module.labels(ref["y"][mine])
    noise = torch.Generator().manual_seed(rank_seed(OFFSETS["validation noise"], rank))  # SDE noise: per rank
    result = pl_module.sample(x0[mine].shape[0], y=y, x0=x0[mine], generator=noise)
    x = result.x
    if result.nfe is not None:  # once per round (the samples are cached below): what one sample cost
        pl_module.log("val/nfe", float(result.nfe))
    if world > 1:  # shares differ in size by one: pad to the largest, gather, drop each rank's padding
        per = -(-n // world)
        padded = torch.zeros(per, *x.shape[1:], dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        gathered = pl_module.all_gather(padded)  # (world, per, ...)
        shares = [rank_share(n, r, world) for r in range(world)]
        x = torch.cat([gathered[r][: s.stop - s.start] for r, s in enumerate(shares)])
    x = x.cpu()
    _ROUND_SAMPLES[pl_module] = (trainer.global_step, x)
    return x


def final_validation(trainer: L.Trainer) -> bool:
    """Whether this validation round is the run's last (at ``max_steps``, or after an early stop)."""
    return trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step


def log_once(trainer: L.Trainer, pl_module, name: str, compute, **kwargs) -> float:
    """``compute()`` on rank 0 only, the value broadcast, and logged by every rank (so that checkpoint callbacks
    monitoring it find it everywhere) as one value: computed once, logged once."""
    value = float(compute()) if trainer.is_global_zero else 0.0
    if trainer.world_size > 1:
        value = float(trainer.strategy.broadcast(value, src=0))
    pl_module.log(name, value, sync_dist=trainer.world_size > 1, **kwargs)
    return value


class DistributionMetrics(EveryNEpochs):
    """Log ``val/w2`` (exact EMD, POT) and ``val/mmd`` of ``n`` samples against ``n`` validation points.

    ``val/w2_floor`` is W2 between the validation and test sets (same size, independent): no model
    can do better at this ``n``. At the last validation of the run, ``val/w2_nfe<k>`` is W2 with the model's sampler
    at ``k`` steps for each ``k`` in ``nfe`` (Euler's for an adaptive solver), and ``val/straightness`` the
    straightness of its ODE (:mod:`flowdiff.straightness`; 1,000 paths, 100 steps): how few steps the model needs.
    """

    data_kinds = ("vector",)
    monitors = {"val/w2": "min"}  # what a checkpoint may select by, and which way is better; the first: monitor=auto

    def __init__(self, n: int = 2000, every_n_epochs: int = 1, nfe: tuple[int, ...] = ()) -> None:
        super().__init__(every_n_epochs)
        self.n = n
        self.nfe = tuple(int(k) for k in nfe or ())
        self.floor: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        n = min(self.n, len(dm.val_set["x1"]), len(dm.test_set["x1"]))
        self.floor = w2(dm.val_set["x1"][:n], dm.test_set["x1"][:n]) if trainer.is_global_zero else math.nan

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        ref = _reference(trainer, self.n)["x1"]
        x = validation_samples(trainer, pl_module, len(ref))
        finite = bool(torch.isfinite(x).all())
        log_once(trainer, pl_module, "val/w2", lambda: w2(x, ref) if finite else math.inf, prog_bar=True)
        log_once(trainer, pl_module, "val/mmd", lambda: mmd(x[:1000], ref[:1000]) if finite else math.inf)
        if self.floor is not None:
            log_once(trainer, pl_module, "val/w2_floor", lambda: self.floor)
        if self.nfe and final_validation(trainer):
            profile = quality_vs_nfe(pl_module, _reference(trainer, self.n), self.nfe) if trainer.is_global_zero else {}
            for key in [f"val/w2_nfe{k}" for k in self.nfe] + ["val/straightness"]:
                log_once(trainer, pl_module, key, lambda key=key: profile.get(key, math.nan))


def quality_vs_nfe(module, reference: dict[str, torch.Tensor], nfe: tuple[int, ...]) -> dict:
    """``{"val/w2_nfe<k>": W2 at k steps of the module's sampler, ..., "val/straightness": S}`` against the points
    ``reference["x1"]`` (the same starting noise at every k; labels from the reference for a CFG model)."""
    ref = reference["x1"]
    y = module.labels(reference["y"])
    x0 = module.draw_source(len(ref), seeded("nfe profile"))
    out = {}
    for k in nfe:
        x = module.sample(len(ref), sampler=module.sampler.with_steps(k), y=y, x0=x0, generator=torch.Generator()).x
        out[f"val/w2_nfe{k}"] = w2(x.cpu(), ref) if bool(torch.isfinite(x).all()) else math.inf
    n = min(1000, len(ref))
    out["val/straightness"] = module.straightness(n, 100, None if y is None else y[:n], generator=torch.Generator())
    return out


class SamplePlot(EveryNEpochs):
    """Save (and send to every logger) samples over data, trajectories and the learned field at several t."""

    data_kinds = ("vector",)

    def __init__(
        self,
        n: int = 2000,
        n_trajectories: int = 64,
        quiver_times: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
        every_n_epochs: int = 1,
        dirname: str = "plots",
    ) -> None:
        self.n, self.n_trajectories = n, n_trajectories
        self.quiver_times = tuple(quiver_times)
        super().__init__(every_n_epochs)
        self.dirname = dirname
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.due(trainer):
            return
        ref = _reference(trainer, self.n)
        x = validation_samples(trainer, pl_module, len(ref["x1"]))  # every rank: a collective under DDP
        if not trainer.is_global_zero:  # one plot, written by rank 0
            return
        k = min(self.n_trajectories, len(ref["x1"]))
        y = pl_module.labels(ref["y"][:k])
        traj = pl_module.sample(k, y=y, return_trajectory=True, generator=seeded("plotted trajectories"))
        lo, hi = pl_module.objective.sample_time_range(pl_module.path)
        v_fn = pl_module.vector_fields().velocity  # unconditional (null-label) field under CFG

        def velocity(grid, t):
            return v_fn(grid.to(pl_module.device), t.clamp(lo, hi).to(pl_module.device))

        step = trainer.global_step
        fig = plot_samples_2d(x, ref["x1"], traj.trajectory, velocity, self.quiver_times, title=f"step {step}")
        out = _run_dir(trainer) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"samples_step{step:07d}.png"
        fig.savefig(path, dpi=90)
        fig.savefig(out / "samples_last.png", dpi=90)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("samples", fig, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples", images=[str(path)], step=step)
        plt.close(fig)
