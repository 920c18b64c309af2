"""The LightningModule: it trains a :class:`~flowdiff.model.FlowModel` (loss, optimiser, logging) and nothing else."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from flowdiff.couplings import Coupling, IndependentCoupling
from flowdiff.model import FlowModel
from flowdiff.nonfinite import NonFiniteLossGuard
from flowdiff.seeds import RandomStreams, seeded


class FlowModule(L.LightningModule):
    """Trains ``model`` on batches paired by ``coupling``.

    The model's own API (``sample``, ``vector_fields``, ``straightness``, ``draw_source``, ``path``, ``objective``,
    ``guidance``, ``sampler``, ...) is reachable on the module too: ``module.sample(...)`` is
    ``module.model.sample(...)``. State dicts (checkpoints) hold the network as ``net.*``.

    Args:
        model: what is trained (and sampled).
        coupling: pairs source and data in a batch (independent by default).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``; Adam 1e-3 by default).
        scheduler: ``optimizer -> LRScheduler``, stepped every training step.
        nan_policy: ``stop``, ``skip`` or ``off``: what a NaN or Inf loss does (:mod:`flowdiff.nonfinite`).
    """

    def __init__(
        self,
        model: FlowModel,
        coupling: Coupling | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        nan_policy: str = "stop",
    ) -> None:
        super().__init__()
        self.model = model
        # checkpoints hold the network as `net.*`, as they always have (a state dict's keys are its format)
        self.register_state_dict_post_hook(_net_keys_out)
        self.register_load_state_dict_pre_hook(_net_keys_in)
        self.coupling = coupling or IndependentCoupling()
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        self.nan = NonFiniteLossGuard(nan_policy)
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints

    def __getattr__(self, name: str) -> Any:  # the model's API on the module: module.sample(...), module.path, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        self.nan.check_world(self.trainer.world_size)
        RandomStreams.seed_rank(self.trainer)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The objective's loss on one batch ``{"x1": data, "y": labels, "x0": source (optional)}``."""
        return self.model.loss(batch, self.coupling, generator)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self.loss(batch)
        trainer = self._trainer
        if self.nan.act_now(loss, trainer):
            self.nan.handle(trainer)  # raises, or counts a skipped batch
            if trainer is not None:
                self.log("train/skipped_batches", float(self.nan.skipped), batch_size=1)
            return None
        # Lightning writes train metrics every `log_every_n_steps` only; calling self.log on the other steps
        # costs a host sync each (measured in bench/overhead.py, docs/BENCHMARKS.md), so log on the steps written
        # and on the last step of each epoch (so short runs and the progress bar still see the loss)
        if (
            trainer is None
            or (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0
            or batch_idx + 1 == trainer.num_training_batches
        ):
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["x1"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        g = seeded("validation loss", batch_idx, batch["x1"].device)  # the same noise every round
        loss = self.loss(batch, generator=g)
        multi = self._trainer is not None and self._trainer.world_size > 1
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["x1"].shape[0], sync_dist=multi)
        return loss

    def configure_optimizers(self):
        opt = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["flowdiff_config"] = self.run_config
        checkpoint["rng_states"] = RandomStreams.state()  # Lightning keeps weights, optimizer and loops only

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        RandomStreams.restore(checkpoint.get("rng_states"), self._trainer)


_MODEL_NET, _NET = "model.net.", "net."


def _net_keys_out(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _MODEL_NET)]:
        state_dict[prefix + _NET + key[len(prefix + _MODEL_NET) :]] = state_dict.pop(key)


def _net_keys_in(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _NET)]:
        state_dict[prefix + _MODEL_NET + key[len(prefix + _NET) :]] = state_dict.pop(key)
