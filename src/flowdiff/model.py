"""A flow or diffusion model without Lightning: a network, a probability path, an objective, guidance and the source.

:class:`FlowModel` is everything a trained model is, and nothing of how it is trained: it predicts, turns the
prediction into the velocity, score and data fields (algebra on the path), draws the source, samples with any
sampler, measures its ODE's straightness and computes its training loss. The LightningModule
(:class:`flowdiff.module.FlowModule`) trains it; ``sample.py``, the stages, the likelihood and the callbacks use it.
A hand-written loop trains it too::

    model = FlowModel(MLP([2]), GaussianPath(CondOTSchedule()), Objective("velocity"), (2,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x1 in batches:
        loss = model.loss({"x1": x1})
        opt.zero_grad(); loss.backward(); opt.step()
    samples = model.sample(1000, EulerSampler(steps=100)).x
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from flowdiff.couplings import Coupling
from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.labels import as_labels
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


def compiled(net: nn.Module, compile: bool | str) -> Callable:
    """``net`` under ``torch.compile`` in mode ``compile`` (``True``: the default mode), or ``net`` itself when
    ``compile`` is false. ``reduce-overhead`` takes shapes as static (CUDA graphs: a new batch size captures once
    more); the other modes let torch.compile generalise over batch sizes."""
    text = str(compile).strip().lower()
    if text in ("false", "0", "none", "no", "off", ""):
        return net
    mode = None if text in ("true", "1", "yes", "on", "default") else str(compile)
    if mode != "reduce-overhead":
        return torch.compile(net, mode=mode)
    fn = torch.compile(net, mode=mode, dynamic=False)

    def replayed(*args, **kwargs) -> Tensor:
        # a CUDA graph's output lives in its memory pool until the next replay overwrites it; samplers keep
        # evaluations across steps (Heun, multistep solvers), so each output is copied out
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs).clone()

    return replayed


class FlowModel(nn.Module):
    """``net`` trained with ``objective`` on ``path``; samples from the source through the path's fields.

    Args:
        net: ``net(x, t, y=None)``, output shaped like ``x``.
        path: a ``GaussianPath`` or, for a non-Gaussian source, a ``NoisyInterpolantPath``.
        objective: what ``net`` predicts (:mod:`flowdiff.objectives`).
        data_shape: shape of one sample, e.g. ``(2,)``.
        guidance: classifier-free guidance, or ``None`` for an unconditional model.
        sampler: the default sampler of :meth:`sample` (Euler, 100 steps, if none).
        source: ``(n, generator) -> (n, *data_shape)`` for a non-Gaussian source; ``None`` means N(0, I).
        data_moments: ``() -> (mean, var)`` of the data per coordinate (called once, when first needed): sampling
            that starts at t0 > 0 (noise and score objectives) draws its start from the Gaussian with the moments
            of ``p_t0`` (:meth:`GaussianPath.source_at`).
        compile: wrap the network in ``torch.compile``: ``True`` (its default mode) or a mode, such as
            ``"reduce-overhead"`` (CUDA graphs: one replay per network evaluation where shapes stay fixed, as in
            fixed-step sampling and training) or ``"max-autotune"``.
        channels_last: keep image networks and their inputs in channels-last memory (faster convolutions on GPUs).
        autocast_dtype: run the network under autocast to this dtype when sampling on a GPU (the solver's state
            stays in the input's dtype); ``None``: no autocast.
    """

    def __init__(
        self,
        net: nn.Module,
        path,
        objective: Objective,
        data_shape: tuple[int, ...],
        guidance: ClassifierFreeGuidance | None = None,
        sampler: Sampler | None = None,
        source: SourceFn | None = None,
        data_moments: Callable[[], tuple[Tensor, Tensor]] | None = None,
        compile: bool | str = False,
        channels_last: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        objective.check_path(path)
        self.net = net
        self.path, self.objective, self.guidance = path, objective, guidance
        self.data_shape = tuple(data_shape)
        self.sampler = sampler or EulerSampler(steps=100)
        self.source = source
        self.autocast_dtype = autocast_dtype
        self.train_t_range = objective.train_time_range(path)  # probed in float32, what training computes in
        self._data_moments_fn = data_moments
        self._data_moments: tuple[Tensor, Tensor] | None = None
        self.channels_last = channels_last and len(self.data_shape) == 3
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        # kept out of nn.Module registration so state dicts hold `net.*` only, compiled or not
        self.__dict__["_forward"] = compiled(net, compile)

    def __getstate__(self) -> dict[str, Any]:
        # copies (EMA deep-copies the LightningModule) leave out the data-moments callable: a method of the
        # datamodule, which holds the trainer, whose DDP launcher holds thread locks that cannot be copied
        state = dict(super().__getstate__())
        state["_data_moments_fn"] = None
        return state

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters(), torch.zeros(())).device

    # ------------------------------------------------------------------ training
    def loss(
        self, batch: dict[str, Tensor], coupling: Coupling | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """The objective's loss on ``{"x1": data, "y": labels, "x0": source (optional)}``: a source draw (N(0, I)
        unless the batch holds one), paired by ``coupling`` (as drawn if ``None``), times from the objective's time
        distribution on the range where the target is finite (uniform by default), labels dropped for CFG in
        training mode."""
        if "c" in batch and batch.get("y") is not None:
            raise ValueError("a batch holds both a context c and labels y: put the labels (a task) into the context")
        z, y = batch["x1"], batch.get("c", batch.get("y"))  # the condition: a context (policies) or labels
        x0 = batch.get("x0")
        if x0 is None:
            x0 = self.noise_like(z, generator)
        if coupling is not None:
            x0, z, y = coupling(x0, z, y, generator=cpu_generator(generator))  # its plan is a NumPy array
        t = self.objective.train_times(z.shape[0], self.train_t_range, z.device, z.dtype, generator)
        if self.channels_last:
            z, x0 = z.contiguous(memory_format=torch.channels_last), x0.contiguous(memory_format=torch.channels_last)
        sample = self.path.sample(z, x0, t, generator=generator)
        y = self.training_labels(y, generator)
        return self.objective.loss(self._forward(sample.x_t, t, y), sample, self.path)

    def training_labels(self, y: Tensor | None, generator: torch.Generator | None = None) -> Tensor | None:
        """The condition the network sees in a loss: labels only with guidance (else none), a context always; under
        CFG dropped to the null condition with its probability in training mode."""
        if y is None or (self.guidance is None and not y.is_floating_point()):
            return None
        if self.guidance is None:
            return y
        return self.guidance.drop_labels(y, generator) if self.training else y

    # ------------------------------------------------------------------ predictions and fields
    def prediction(self, x: Tensor, t: Tensor, y: Tensor | None = None, guidance_scale: float | None = None) -> Tensor:
        """The network's (guided) prediction at ``(x, t)``: one forward, a doubled batch under CFG."""
        if y is not None and self.guidance is None and not y.is_floating_point():
            raise ValueError("this model was trained without guidance=cfg, so it cannot condition on labels")
        if self.autocast_dtype is None or x.device.type != "cuda" or torch.is_autocast_enabled():
            return self._guided(x, t, y, guidance_scale)
        with torch.autocast("cuda", dtype=self.autocast_dtype):
            return self._guided(x, t, y, guidance_scale).to(x.dtype)

    def _guided(self, x: Tensor, t: Tensor, y: Tensor | None, guidance_scale: float | None) -> Tensor:
        if y is None or self.guidance is None:  # unconditional, or a context without CFG
            return self._forward(x, t, y)
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
                yy = as_labels(x.shape[0], y)
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

    # ------------------------------------------------------------------ the source and the start
    def data_moments(self) -> tuple[Tensor | None, Tensor | None]:
        """The data's per-coordinate mean and variance, or ``(None, None)`` when the model was built without them."""
        if self._data_moments is None and self._data_moments_fn is not None:
            self._data_moments = self._data_moments_fn()
        return self._data_moments if self._data_moments is not None else (None, None)

    @staticmethod
    def noise_like(z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """N(0, I) shaped, typed and placed like ``z``: the training noise (``generator`` on ``z``'s device)."""
        return torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)

    def draw_source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the source (N(0, I) unless the model has another), on the model's device."""
        if self.source is not None:
            return self.source(n, generator).to(self.device)
        x = torch.randn((n, *self.data_shape), generator=generator).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _moment_matched_start(self, t_start: float) -> bool:
        return self.source is None and t_start > 0 and hasattr(self.path, "source_at")

    def start_at(self, x0: Tensor, t_start: float) -> Tensor:
        """The sampler's starting state at ``t_start``: ``x0`` itself at t = 0; N(0, I) is p_0, not p_t0, so later
        starts draw from the Gaussian with the moments of ``p_t0`` (:meth:`GaussianPath.source_at`)."""
        if self._moment_matched_start(t_start):
            return self.path.source_at(x0, t_start, *self.data_moments())
        return x0

    def start_log_prob(self, x: Tensor, t_start: float) -> Tensor:
        """``log p(x)`` ``(B,)`` of the distribution sampling starts from at ``t_start`` (what :meth:`start_at`
        makes of N(0, I)): N(0, I) at t = 0, the moment-matched Gaussian later; the likelihood's prior."""
        if self.source is not None:
            raise ValueError("the likelihood needs a Gaussian source: this model flows from another distribution")
        if not self._moment_matched_start(t_start):
            return gaussian_log_prob(x, torch.zeros_like(x[:1]), torch.ones_like(x[:1]))
        return gaussian_log_prob(x, *self.path.source_moments(t_start, x, *self.data_moments()))

    @property
    def num_classes(self) -> int:
        """The classes the model is conditioned on (the null label's index under CFG); 0 when unconditional."""
        return self.guidance.null_label if self.guidance is not None else 0

    def labels(self, y: Tensor | None) -> Tensor | None:
        """The condition the network sees: a context always, labels for a CFG model, ``None`` otherwise."""
        if y is not None and y.is_floating_point():
            return y
        return y if self.guidance is not None else None

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (BatchNorm's running statistics, no label dropout) for the block, then the mode it was in."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ sampling
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
        """Draw ``n`` samples with ``sampler`` (the model's default if ``None``).

        ``y`` (an int or ``(n,)`` labels) conditions a CFG-trained model with weight ``guidance_scale``
        (``w = 1`` conditional, ``w = 0`` unconditional; default: the configured scale).
        ``generator`` (a CPU generator) makes the source draw and the SDE noise reproducible.
        ``on_evaluation()`` is called after each network evaluation (a progress bar).
        """
        sampler = sampler or self.sampler
        missing = {*sampler.fields, *sampler.conversions} - set(self.path.parameterisations)
        if missing:
            raise ValueError(
                f"{type(sampler).__name__} needs the {', '.join(sorted(missing))} field, so a Gaussian source: use "
                "an ODE sampler"
            )
        x0 = self.draw_source(n, generator) if x0 is None else x0.to(self.device)
        fields = self.vector_fields(as_labels(n, y, self.device), guidance_scale, on_evaluation)
        with self.evaluating():
            noise_gen = None
            if generator is not None and self.device.type != "cpu":  # seeded by a draw: each call its own noise
                seed = int(torch.randint(0, 2**62, (), generator=generator))
                noise_gen = torch.Generator(device=self.device).manual_seed(seed)
            t_span = self.objective.sample_time_range(self.path, dtype=x0.dtype, fields=sampler.fields)
            x0 = self.start_at(x0, float(sampler.times(x0, t_span, self.path)[0]))
            return sampler.sample(
                fields.velocity,
                x0,
                score_fn=fields.score,
                data_fn=fields.data,
                t_span=t_span,
                return_trajectory=return_trajectory,
                generator=noise_gen or generator,
                path=self.path,
            )

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
        fields = self.vector_fields(as_labels(n, y, self.device), guidance_scale, on_evaluation)
        t_span = self.objective.sample_time_range(self.path, dtype=x0.dtype)
        with self.evaluating():
            return straightness(fields.velocity, self.start_at(x0, t_span[0]), t_span, steps)[0]
