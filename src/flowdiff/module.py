"""The LightningModule: a network trained with an objective on a probability path, and sampling from it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn

from flowdiff.couplings import Coupling, IndependentCoupling
from flowdiff.errors import NonFiniteLoss
from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.likelihood import gaussian_log_prob
from flowdiff.objectives import Objective
from flowdiff.samplers import EulerSampler, Sampler, SampleResult
from flowdiff.straightness import straightness
from flowdiff.utils import cpu_generator

SourceFn = Callable[[int, "torch.Generator | None"], Tensor]
FieldFn = Callable[[Tensor, Tensor], Tensor]


class VectorFields(NamedTuple):
    """The trained model's fields at ``(x, t)``, all from one network forward: the velocity (ODEs), the score
    (SDEs) and the data prediction ``E[z | x_t]`` (the sampler's last step; ``None`` off Gaussian paths)."""

    velocity: FieldFn
    score: FieldFn
    data: FieldFn | None


class FlowModule(L.LightningModule):
    """Wires ``net`` + ``path`` + ``objective`` + ``coupling`` + ``guidance``; :meth:`sample` works outside training.

    Args:
        net: ``net(x, t, y=None)``, output shaped like ``x``.
        path: a ``GaussianPath`` or, for a non-Gaussian source, a ``NoisyInterpolantPath``.
        objective: what ``net`` predicts (see :mod:`flowdiff.objectives`).
        data_shape: shape of one sample, e.g. ``(2,)``.
        coupling: pairs source and data in a batch (independent by default).
        guidance: classifier-free guidance, or ``None`` for an unconditional model.
        sampler: the default sampler of :meth:`sample` (Euler, 100 steps, if none).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler``, stepped every training step.
        source: ``(n, generator) -> (n, *data_shape)`` for a non-Gaussian source; ``None`` means N(0, I).
        compile: wrap the network in ``torch.compile``.
        channels_last: keep image networks and their inputs in channels-last memory (faster convolutions
            on GPUs, above all under bf16).
        autocast_dtype: run the network under autocast to this dtype when sampling on a GPU (the solver's
            state stays in the input's dtype); ``None``: no autocast.
        nan_policy: a NaN or Inf training loss ``"stop"``s the run, naming the step and the last checkpoint, or is
            ``"skip"``ped (no update from that batch; counted in ``train/skipped_batches``; one host
            synchronisation per step). On a GPU ``stop`` looks every ``log_every_n_steps`` steps; ``"off"``
            checks nothing.
        data_moments: ``() -> (mean, var)`` of the data per coordinate (called once, when first needed): sampling
            that starts at t0 > 0 (noise and score objectives) draws its start from the Gaussian with the moments
            of ``p_t0`` (:meth:`GaussianPath.source_at`).
    """

    def __init__(
        self,
        net: nn.Module,
        path,
        objective: Objective,
        data_shape: tuple[int, ...],
        coupling: Coupling | None = None,
        guidance: ClassifierFreeGuidance | None = None,
        sampler: Sampler | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        source: SourceFn | None = None,
        compile: bool = False,
        channels_last: bool = False,
        autocast_dtype: torch.dtype | None = None,
        data_moments: Callable[[], tuple[Tensor, Tensor]] | None = None,
        nan_policy: str = "stop",
    ) -> None:
        super().__init__()
        if nan_policy not in ("stop", "skip", "off"):
            raise ValueError(f"nan_policy must be stop, skip or off, got {nan_policy!r}")
        self.nan_policy = nan_policy
        self.skipped_batches = 0
        self._first_bad_step: Tensor | None = None  # on a GPU under nan_policy=stop, see _loss_is_bad
        self.nan_check_every_step: bool | None = None  # None: on the CPU only
        objective.check_path(path)
        self.net = net
        self.path = path
        self.objective = objective
        self.data_shape = tuple(data_shape)
        self.coupling = coupling or IndependentCoupling()
        self.guidance = guidance
        self.sampler = sampler or EulerSampler(steps=100)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        self.source = source
        self.train_t_range = objective.train_time_range(path)  # probed in float32, what training computes in
        self.run_config: dict | None = None  # the resolved Hydra config, stored in checkpoints
        self.sample_nfe: int | None = None  # network evaluations per sample in the last validation round
        self.autocast_dtype = autocast_dtype
        self._data_moments_fn = data_moments
        self._data_moments: tuple[Tensor, Tensor] | None = None
        self.channels_last = channels_last and len(self.data_shape) == 3
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        # kept out of nn.Module registration so checkpoints hold `net.*` only, compiled or not
        self.__dict__["_forward"] = torch.compile(net) if compile else net

    def __getstate__(self) -> dict[str, Any]:
        # copies (Lightning's EMA deep-copies the module) leave out the data-moments callable: a method of the
        # datamodule, which holds the trainer, whose DDP launcher holds thread locks that cannot be copied
        state = dict(super().__getstate__())
        state["_data_moments_fn"] = None
        return state

    # ------------------------------------------------------------------ training
    def setup(self, stage: str) -> None:
        if self.nan_policy == "skip" and self.trainer.world_size > 1:
            raise ValueError(
                "nan_policy=skip cannot run under DDP (one rank skipping its backward would stall the "
                "others): use nan_policy=stop"
            )
        if self.trainer.world_size > 1:  # independent noise and times on every DDP rank
            torch.manual_seed(torch.initial_seed() + 7919 * self.trainer.global_rank)

    def _draw_t(self, n: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        lo, hi = self.train_t_range
        return lo + (hi - lo) * torch.rand(n, device=like.device, dtype=like.dtype, generator=generator)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """The objective's loss on one batch ``{"x1": data, "y": labels, "x0": source (optional)}``."""
        z, y = batch["x1"], batch.get("y")
        x0 = batch.get("x0")
        if x0 is None:
            x0 = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        x0, z, y = self.coupling(x0, z, y, generator=cpu_generator(generator))  # its plan is a NumPy array
        t = self._draw_t(z.shape[0], z, generator)
        if self.channels_last:
            z, x0 = z.contiguous(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
        sample = self.path.sample(z, x0, t, generator=generator)
        if self.guidance is not None and y is not None:
            y = self.guidance.drop_labels(y, generator) if self.training else y
        else:
            y = None
        return self.objective.loss(self._forward(sample.x_t, t, y), sample, self.path)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss = self.loss(batch)
        if self._loss_is_bad(loss):
            return self._non_finite(loss)
        # Lightning writes train metrics every `log_every_n_steps` only; calling self.log on the other steps
        # costs about 2 ms each on a small model (bench/overhead.py), so log on the steps that are written
        # and on the last step of each epoch (so short runs and the progress bar still see the loss)
        trainer = self._trainer
        if (
            trainer is None
            or (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0
            or batch_idx + 1 == trainer.num_training_batches
        ):
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["x1"].shape[0])
        return loss

    def _loss_is_bad(self, loss: Tensor) -> bool:
        """Whether to act on a non-finite loss now. ``skip`` and the CPU look at every step (a host sync); ``stop`` on
        a GPU keeps the first bad step on the device and looks every ``log_every_n_steps`` steps, so that the
        check does not stall the launch queue (the weights may go NaN in between; the checkpoints stay good)."""
        if self.nan_policy == "off":
            return False
        trainer = self._trainer
        every_step = self.nan_check_every_step
        if every_step is None:
            every_step = loss.device.type == "cpu"
        if self.nan_policy == "skip" or every_step or trainer is None:
            return not bool(torch.isfinite(loss))
        step = torch.full((), trainer.global_step, device=loss.device, dtype=torch.long)
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, device=loss.device, dtype=torch.long)
        first = self._first_bad_step
        self._first_bad_step = torch.where((first < 0) & ~torch.isfinite(loss), step, first)
        return (trainer.global_step + 1) % max(trainer.log_every_n_steps, 1) == 0 and int(self._first_bad_step) >= 0

    def _non_finite(self, loss: Tensor) -> None:
        """Skip the batch (``nan_policy=skip``: Lightning makes no update when training_step returns None) or stop."""
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else 0
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            step = int(self._first_bad_step)
        if self.nan_policy == "skip":
            self.skipped_batches += 1
            if trainer is not None:
                self.log("train/skipped_batches", float(self.skipped_batches), batch_size=1)
            return None
        saved = [c.last_model_path for c in getattr(trainer, "checkpoint_callbacks", []) if c.last_model_path]
        ckpt = max(saved, key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0, default="none yet")
        raise NonFiniteLoss(
            f"the training loss became NaN or Inf at step {step}; last checkpoint: {ckpt}. Lower optimizer.lr, set "
            "trainer.gradient_clip_val, or set nan_policy=skip to skip such batches"
        )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        g = torch.Generator(device=batch["x1"].device).manual_seed(batch_idx)  # same noise every epoch
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
        # the stream of training noise, times, couplings and label drops: a resumed run draws what an
        # uninterrupted one would have drawn (Lightning keeps weights, optimizer, scheduler and loops only)
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        trainer = self._trainer
        if states is None or trainer is None or trainer.state.fn != "fit":  # only a resumed fit continues a stream
            return
        torch.set_rng_state(states["torch"])
        if torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        if trainer.world_size > 1:  # the checkpoint holds rank 0's stream: every other rank derives its own
            torch.manual_seed(int(torch.randint(2**62, (1,))) + 7919 * trainer.global_rank)

    # ------------------------------------------------------------------ sampling
    def prediction(self, x: Tensor, t: Tensor, y: Tensor | None = None, guidance_scale: float | None = None) -> Tensor:
        """The network's (guided) prediction at ``(x, t)``: one forward, a doubled batch under CFG."""
        if y is not None and self.guidance is None:
            raise ValueError("this model was trained without guidance=cfg, so it cannot condition on labels")
        if self.autocast_dtype is None or x.device.type != "cuda" or torch.is_autocast_enabled():
            return self._guided(x, t, y, guidance_scale)
        with torch.autocast("cuda", dtype=self.autocast_dtype):
            return self._guided(x, t, y, guidance_scale).to(x.dtype)

    def _guided(self, x: Tensor, t: Tensor, y: Tensor | None, guidance_scale: float | None) -> Tensor:
        if y is None:
            return self._forward(x, t, None)
        return self.guidance.guided(self._forward, x, t, y, guidance_scale)

    def vector_fields(
        self,
        y: Tensor | None = None,
        guidance_scale: float | None = None,
        on_evaluation: Callable[[], None] | None = None,
    ) -> VectorFields:
        """The velocity, score and data fields of the trained model; all reuse one network forward at the same
        ``(x, t)``. ``on_evaluation()`` is called after each network evaluation (a progress bar)."""
        cache: dict[str, Tensor] = {}

        def predict(x: Tensor, t: Tensor) -> Tensor:
            if cache.get("x") is not x or cache.get("t") is not t:
                yy = None if y is None else y.expand(x.shape[0]) if y.dim() == 0 else y
                cache.update(x=x, t=t, pred=self.prediction(x, t, yy, guidance_scale))
                if on_evaluation is not None:
                    on_evaluation()
            return cache["pred"]

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return self.objective.to_velocity(self.path, predict(x, t), x, t)

        def score(x: Tensor, t: Tensor) -> Tensor:
            return self.objective.to_score(self.path, predict(x, t), x, t)

        def data(x: Tensor, t: Tensor) -> Tensor:
            return self.objective.to_data(self.path, predict(x, t), x, t)

        return VectorFields(velocity, score, data if "data" in self.path.parameterisations else None)

    def data_moments(self) -> tuple[Tensor | None, Tensor | None]:
        """The data's per-coordinate mean and variance, or ``(None, None)`` when the module was built without them."""
        if self._data_moments is None and self._data_moments_fn is not None:
            self._data_moments = self._data_moments_fn()
        return self._data_moments if self._data_moments is not None else (None, None)

    @contextlib.contextmanager
    def _evaluating(self):
        """Eval mode (BatchNorm's running statistics, no label dropout) for the block, then the mode it was in."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _labels(self, n: int, y: Tensor | int | None) -> Tensor | None:
        if isinstance(y, int):
            y = torch.full((n,), y, dtype=torch.long)
        return None if y is None else y.to(self.device)

    def _moment_matched_start(self, t_start: float) -> bool:
        return self.source is None and t_start > 0 and hasattr(self.path, "source_at")

    def _start_at(self, x0: Tensor, t_start: float) -> Tensor:
        """The sampler's starting state at ``t_start``: ``x0`` itself at t = 0; N(0, I) is p_0, not p_t0, so later
        starts draw from the Gaussian with the moments of ``p_t0`` (:meth:`GaussianPath.source_at`)."""
        if self._moment_matched_start(t_start):
            return self.path.source_at(x0, t_start, *self.data_moments())
        return x0

    def start_log_prob(self, x: Tensor, t_start: float) -> Tensor:
        """``log p(x)`` ``(B,)`` of the distribution sampling starts from at ``t_start`` (what :meth:`_start_at`
        makes of N(0, I)): N(0, I) at t = 0, the moment-matched Gaussian later; the likelihood's prior."""
        if self.source is not None:
            raise ValueError("the likelihood needs a Gaussian source: this model flows from another distribution")
        if not self._moment_matched_start(t_start):
            return gaussian_log_prob(x, torch.zeros_like(x[:1]), torch.ones_like(x[:1]))
        return gaussian_log_prob(x, *self.path.source_moments(t_start, x, *self.data_moments()))

    @torch.no_grad()
    def straightness(
        self,
        n: int,
        steps: int = 100,
        y: Tensor | int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        on_evaluation: Callable[[], None] | None = None,
    ) -> float:
        """The straightness ``E int ||(X_1 - X_0) - v(X_t, t)||^2 dt`` of the model's ODE along its own trajectories
        from ``n`` starting points drawn as :meth:`sample` draws them (:mod:`flowdiff.straightness`);
        ``on_evaluation()`` after each of its ``steps`` network evaluations (a progress bar)."""
        x0 = self.draw_source(n, generator)
        fields = self.vector_fields(self._labels(n, y), guidance_scale, on_evaluation)
        t_span = self.objective.sample_time_range(self.path, dtype=x0.dtype)
        with self._evaluating():
            return straightness(fields.velocity, self._start_at(x0, t_span[0]), t_span, steps)[0]

    def draw_source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.source is not None:
            return self.source(n, generator).to(self.device)
        x = torch.randn((n, *self.data_shape), generator=generator).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: Sampler | None = None,
        y: Tensor | int | None = None,
        guidance_scale: float | None = None,
        x0: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        on_evaluation: Callable[[], None] | None = None,
    ) -> SampleResult:
        """Draw ``n`` samples with ``sampler`` (the module's default if ``None``).

        ``y`` (an int or ``(n,)`` labels) conditions a CFG-trained model with weight ``guidance_scale``
        (``w = 1`` conditional, ``w = 0`` unconditional; default: the configured scale).
        ``generator`` (a CPU generator) makes the source draw and the SDE noise reproducible.
        ``on_evaluation()`` is called after each network evaluation (a progress bar).
        """
        sampler = sampler or self.sampler
        if sampler.stochastic and "score" not in self.path.parameterisations:
            raise ValueError(f"{type(sampler).__name__} needs a score, so a Gaussian source: use an ODE sampler")
        x0 = self.draw_source(n, generator) if x0 is None else x0.to(self.device)
        y = self._labels(n, y)
        fields = self.vector_fields(y, guidance_scale, on_evaluation)
        with self._evaluating():
            noise_gen = None
            if generator is not None and self.device.type != "cpu":
                noise_gen = torch.Generator(device=self.device).manual_seed(int(generator.initial_seed()))
            t_span = self.objective.sample_time_range(self.path, dtype=x0.dtype, fields=sampler.fields)
            x0 = self._start_at(x0, float(sampler.grid(x0, t_span)[0]))
            return sampler.sample(
                fields.velocity,
                x0,
                score_fn=fields.score,
                data_fn=fields.data,
                t_span=t_span,
                return_trajectory=return_trajectory,
                generator=noise_gen or generator,
            )
