"""Turn a composed Hydra config into data, path, objective, sampler and module; refuse nonsense early.

Every invalid combination stops here with one sentence that names the fix (:class:`ConfigError`),
before any Lightning machinery starts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowdiff.couplings import Coupling, IndependentCoupling, MinibatchOTCoupling
from flowdiff.data.pairs import PairsDataModule
from flowdiff.errors import ConfigError, DataError, SettingError
from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.model import FlowModel
from flowdiff.module import FlowModule
from flowdiff.objectives import Objective
from flowdiff.paths import GaussianPath, NoisyInterpolantPath
from flowdiff.samplers import SAMPLERS, Sampler, build_sampler
from flowdiff.stages.consistency import ConsistencyModule, SongCurriculum, consistency_problem
from flowdiff.stages.distill import DistillationModule
from flowdiff.stages.reflow import ReflowCoupling
from flowdiff.stages.trajectories import load_or_make_trajectories, on_grid


def plain_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return dict(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else dict(cfg)


class Teacher(NamedTuple):
    """The trained model a stage starts from: its checkpoint ``path``, the rebuilt ``module``, its data and config."""

    path: str
    module: FlowModule
    datamodule: Any
    cfg: DictConfig


def stage_name(cfg: DictConfig) -> str:
    """``train``, ``reflow``, ``distill`` or ``consistency`` (``coupling=reflow`` alone is the reflow stage)."""
    name = OmegaConf.select(cfg, "stage.name", default="train")
    return "reflow" if cfg.coupling.name == "reflow" else name


def load_teacher(cfg: DictConfig) -> Teacher | None:
    """The teacher of a stage (``teacher=<ckpt>``), or ``None`` for ``stage=train`` and consistency training. A
    missing or foreign file, or a teacher the stage needs but lacks, is one sentence."""
    stage = stage_name(cfg)
    path = OmegaConf.select(cfg, "teacher", default=None)
    if stage == "reflow":
        path = cfg.coupling.get("teacher") or path
    if stage == "train":
        if path is not None:
            raise ConfigError(
                f"teacher={path} is set but stage=train does not use one: add stage=reflow, stage=distill or "
                "stage=consistency, or drop teacher"
            )
        return None
    if path is None:
        if stage == "consistency":
            return None  # consistency training, from data
        raise ConfigError(f"stage={stage} needs teacher=<a checkpoint written by train.py>")
    from flowdiff.cli.sample import load_checkpoint  # sample.py's reader: one sentence for a bad file

    try:
        module, datamodule, teacher_cfg = load_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"teacher: {err}") from None
    return Teacher(str(path), module, datamodule, teacher_cfg)


def build_datamodule(cfg: DictConfig, teacher: Teacher | None = None):
    """``cfg.data``; unreadable or missing data is one sentence (:class:`ConfigError`). With a ``teacher`` and
    ``stage=reflow`` or ``stage=distill``, the training batches are the teacher's trajectories
    (:class:`PairsDataModule`, drawn when training starts); without one (a trained student sampling) it is the data."""
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DataError):
            raise ConfigError(str(cause)) from None
        raise
    stage = stage_name(cfg)
    if teacher is None or stage not in ("reflow", "distill"):
        return datamodule
    check_teacher(cfg, datamodule, teacher)
    if stage == "reflow":
        settings, steps, key = cfg.coupling, 1, "coupling.sampler"
        sampler_cfg = settings.sampler
    else:
        settings, steps, key = cfg.distill, int(cfg.distill.steps), "distill.sampler"
        sampler_cfg = _teacher_sampler(cfg, teacher) if settings.get("progressive") else settings.sampler

    try:  # a teacher sampler whose grid misses the student's times: one sentence now, not when training starts
        sampler = on_grid(build_sampler_from(sampler_cfg, teacher.module.path, key), steps)
    except ValueError as err:
        raise ConfigError(f"stage={stage}: {err}") from None

    def make_trajectories():
        trajectories, _ = load_or_make_trajectories(
            teacher.path,
            teacher.module,
            sampler,
            plain_dict(sampler_cfg),
            int(settings.n_pairs),
            settings.cache_dir,
            steps,
            int(settings.get("batch_size", 5000)),
            int(cfg.seed),
        )
        return trajectories

    steps_per_epoch = getattr(datamodule, "steps_per_epoch", None)
    return PairsDataModule(datamodule, make_trajectories, int(cfg.data.batch_size), steps_per_epoch, int(cfg.seed))


def _teacher_sampler(cfg: DictConfig, teacher: Teacher) -> DictConfig:
    """``distill.progressive``: the teacher's own sampler, which must take twice the student's steps."""
    own = teacher.cfg.sampler
    steps = int(cfg.distill.steps)
    if own.name == "dopri5" or int(own.get("steps") or 0) != 2 * steps:
        raise ConfigError(
            f"distill.progressive=true halves the teacher's steps, but its sampler is {own.name} with "
            f"{own.get('steps')} steps: give it a teacher sampled in {2 * steps} fixed steps (a distilled student), "
            "or set distill.progressive=false"
        )
    return own


def check_teacher(cfg: DictConfig, datamodule, teacher: Teacher) -> None:
    """A teacher must have been trained on this run's data, with labels exactly when this run has them."""
    stage = stage_name(cfg)
    ours = (datamodule.name, tuple(datamodule.data_shape))
    theirs = (teacher.datamodule.name, tuple(teacher.datamodule.data_shape))
    if ours != theirs:
        raise ConfigError(
            f"stage={stage}: the teacher was trained on data={theirs[0]} {theirs[1]}, this run is on "
            f"data={ours[0]} {ours[1]}: use the teacher's data"
        )
    guided, teacher_guided = cfg.guidance.name != "none", teacher.module.guidance is not None
    if guided != teacher_guided:
        raise ConfigError(
            f"stage={stage}: the teacher was trained with guidance={'cfg' if teacher_guided else 'none'}, this run "
            f"with guidance={cfg.guidance.name}: use the teacher's"
        )
    if stage == "consistency":
        lo, _ = teacher.module.objective.sample_time_range(teacher.module.path)
        if lo > 0:
            raise ConfigError(
                f"stage=consistency: the teacher's velocity is not finite at t = 0 (its objective "
                f"{teacher.module.objective.prediction} is sampled from t = {lo:.3g}), where distillation starts: "
                "use a cfm or data teacher, or teacher=null for consistency training"
            )


def build_path(cfg: DictConfig, gaussian_source: bool):
    """``GaussianPath`` for a Gaussian source with ``path.sigma = 0``, else torchcfm's noisy interpolant."""
    schedule = instantiate(cfg.path.schedule)
    sigma = float(cfg.path.get("sigma", 0.0))
    if gaussian_source and sigma == 0:
        return GaussianPath(schedule)
    return NoisyInterpolantPath(schedule, sigma=sigma)


def build_objective(cfg: DictConfig) -> Objective:
    kw = plain_dict(cfg.objective)
    return Objective.from_name(kw.pop("name"), **kw)


def build_coupling(cfg: DictConfig) -> Coupling:
    kw = plain_dict(cfg.coupling)
    name = kw.pop("name")
    if name == "independent":
        return IndependentCoupling(**kw)
    if name == "minibatch_ot":
        return MinibatchOTCoupling(**kw)
    if name == "reflow":
        return ReflowCoupling()
    raise ConfigError(
        f"unknown coupling {name!r}; use coupling=independent, coupling=ot, coupling=sinkhorn or coupling=reflow"
    )


def build_guidance(cfg: DictConfig, net: torch.nn.Module) -> ClassifierFreeGuidance | None:
    """Classifier-free guidance with the net's own null label (the last row of its label embedding)."""
    kw = plain_dict(cfg.guidance)
    if kw.pop("name") == "none":
        return None
    return ClassifierFreeGuidance(null_label=net.null_label, **kw)


def build_sampler_from(sampler_cfg: DictConfig | dict, path, key: str = "sampler") -> Sampler:
    """The sampler of the config node ``key`` (``sampler``, ``distill.sampler``, ...); a setting out of its range is
    one sentence naming ``key.<setting>``."""
    kw = plain_dict(sampler_cfg)
    try:
        return build_sampler(kw.pop("name"), path=path, **{k: v for k, v in kw.items() if v is not None})
    except SettingError as err:
        raise ConfigError(f"{key}.{err}") from None


def _number(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default=None)
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number: set {key} to one")
    return value


def check_values(cfg: DictConfig, datamodule) -> None:
    """Out-of-range values stop here, each in one sentence naming the key and the range it must lie in."""
    rules = [  # key, test, what the value must be
        ("trainer.max_steps", lambda v: v >= 1 or v == -1, "a positive number of training steps"),
        ("distill.steps", lambda v: v >= 1, "at least 1 (the student's number of steps)"),
        ("distill.n_pairs", lambda v: v >= 1, "at least 1"),
        ("coupling.n_pairs", lambda v: v >= 1, "at least 1"),
        ("data.batch_size", lambda v: v >= 1, "at least 1"),
        ("optimizer.lr", lambda v: v > 0, "a positive learning rate, such as 1e-3"),
        ("optimizer.weight_decay", lambda v: v >= 0, "0 or more"),
        ("trainer.gradient_clip_val", lambda v: v > 0, "a positive norm, or null for no clipping"),
        ("callbacks.ema.decay", lambda v: 0 < v < 1, "inside (0, 1), such as 0.999 (callbacks.ema=null turns EMA off)"),
        ("callbacks.last_checkpoint.every_n_train_steps", lambda v: v >= 1, "at least 1"),
    ]
    if cfg.guidance.name != "none":
        rules.append(("guidance.p_uncond", lambda v: 0 <= v < 1, "inside [0, 1), such as 0.1"))
    if datamodule.kind == "vector":
        n_ref = min(len(datamodule.val_set["x1"]), len(datamodule.test_set["x1"]))
        fits = (lambda v: 1 <= v <= n_ref, f"between 1 and {n_ref}, the size of the reference set (data.n_val)")
        rules += [("callbacks.metrics.n", *fits), ("callbacks.plot.n", *fits)]
    for key, ok, what in rules:
        value = _number(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value} is out of range: set it to {what}")
    for key in ("callbacks.metrics.nfe", "callbacks.image_metrics.nfe"):  # the end-of-run profiles' step counts
        for k in OmegaConf.select(cfg, key, default=None) or ():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"{key} holds {k!r}: set it to step counts of at least 1, such as [1, 2, 4, 8]")


def validate(cfg: DictConfig, datamodule) -> None:
    """Raise :class:`ConfigError` for a combination that makes no sense, naming the options to change."""
    check_values(cfg, datamodule)
    objective = cfg.objective.name
    sampler = cfg.sampler.name
    guided = cfg.guidance.name != "none"
    gaussian = datamodule.gaussian_source and float(cfg.path.get("sigma", 0.0)) == 0
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler={sampler} is unknown; choose one of {', '.join(SAMPLERS)}")
    nan_policy = cfg.get("nan_policy", "stop")
    if nan_policy not in ("stop", "skip", "off"):
        raise ConfigError(f"nan_policy={nan_policy} is unknown; choose stop, skip or off")
    if nan_policy == "skip" and "ddp" in str(cfg.get("trainer", {}).get("strategy", "")):
        raise ConfigError(
            "nan_policy=skip cannot run under DDP (one rank skipping its update stalls the others): use nan_policy=stop"
        )
    if guided and datamodule.num_classes == 0:
        raise ConfigError(
            f"guidance={cfg.guidance.name} needs labelled data, but data={datamodule.name} has no labels: "
            "use guidance=none or a labelled dataset"
        )
    if not gaussian and objective != "cfm":
        why = f"data.source={datamodule.source_name}" if not datamodule.gaussian_source else "path.sigma > 0"
        raise ConfigError(
            f"objective={objective} needs a Gaussian source with path.sigma=0, but {why}: use objective=cfm"
        )
    if not gaussian and sampler in ("ddim", "euler_maruyama", "consistency"):
        raise ConfigError(
            f"sampler={sampler} needs a Gaussian path (a score or data prediction), but the source is not Gaussian "
            "or path.sigma > 0: use an ODE sampler such as sampler=euler"
        )
    stage = stage_name(cfg)
    if stage == "distill" and (objective not in ("cfm", "data") or sampler != "euler"):
        raise ConfigError(
            f"stage=distill trains Euler steps of a velocity from t = 0, which objective={objective} with "
            f"sampler={sampler} does not give: use objective=cfm (or data) and sampler=euler"
        )
    needs_score = sampler == "euler_maruyama" or (sampler == "ddim" and float(cfg.sampler.get("eta") or 0) > 0)
    if cfg.coupling.name == "reflow" and objective not in ("cfm", "data"):
        raise ConfigError(
            f"coupling=reflow pairs each noise with the teacher's sample of it, so the noise is not independent of "
            f"the data and objective={objective} (a score) has no meaning: use objective=cfm or objective=data"
        )
    if cfg.coupling.name == "reflow" and needs_score:
        raise ConfigError(
            f"sampler={sampler} needs the score, which coupling=reflow does not define (its noise is paired with "
            "the data): use an ODE sampler such as sampler=euler"
        )
    if cfg.coupling.name == "minibatch_ot" and needs_score:
        raise ConfigError(
            f"sampler={sampler} needs the score, whose formula -E[eps | x_t] / beta_t assumes noise drawn "
            "independently of the data, which minibatch OT is not: use coupling=independent, or an ODE sampler "
            "(ddim with eta=0 is one)"
        )
    if cfg.coupling.get("by_label") and datamodule.num_classes == 0:
        raise ConfigError(f"coupling.by_label=true needs labelled data, but data={datamodule.name} has none")


def consistency_curriculum(settings: DictConfig):
    """Consistency training's curriculum; a checkpoint written before curricula were a choice (its ``s0``, ``s1``,
    ``mu0`` beside the other settings) trained with Song et al.'s."""
    if "curriculum" in settings:
        try:
            return instantiate(settings.curriculum)
        except InstantiationException as err:
            raise ConfigError(str(err.__cause__ or err)) from None
    return SongCurriculum(settings.s0, settings.s1, settings.mu0)


def build_net(cfg: DictConfig, data_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """``cfg.net`` for data of ``data_shape``; a net that does not fit the data is one sentence."""
    try:
        return instantiate(cfg.net, data_shape=list(data_shape), num_classes=num_classes)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        raise


def build_module(cfg: DictConfig, datamodule, teacher: Teacher | None = None) -> FlowModule:
    """The module for ``cfg`` (validated first; a :class:`DistillationModule` or :class:`ConsistencyModule` for those
    stages); the network's sizes come from the data. A stage being trained with a ``teacher`` starts from its weights
    (``init_from_teacher``); consistency distillation also steps the teacher's ODE in its loss."""
    validate(cfg, datamodule)
    stage = stage_name(cfg)
    if stage == "distill" and int(cfg.sampler.steps) != int(cfg.distill.steps):  # sample.py may sample otherwise
        raise ConfigError(
            f"stage=distill trains a {cfg.distill.steps}-step student but sampler.steps={cfg.sampler.steps}: drop "
            "sampler.steps (it follows distill.steps)"
        )
    if teacher is not None:
        check_teacher(cfg, datamodule, teacher)
    path = build_path(cfg, datamodule.gaussian_source)
    objective = build_objective(cfg)
    conditional = cfg.guidance.name != "none"
    net = build_net(cfg, datamodule.data_shape, datamodule.num_classes if conditional else 0)
    guidance = build_guidance(cfg, net)
    source = None
    if not datamodule.gaussian_source:
        toy = datamodule.source  # a distribution object, not the datamodule

        def source(n, generator=None):
            return toy.sample(n, generator)[0]

    cls, settings, extra = FlowModule, cfg.coupling, {}
    if stage == "distill":
        cls, settings = DistillationModule, cfg.distill
        extra = {"loss": cfg.distill.loss}
    elif stage == "consistency":
        problem = consistency_problem(path, objective)
        if problem is not None:
            fix = "use path=condot or path=cosine" if objective.prediction == "velocity" else "use objective=cfm"
            raise ConfigError(
                f"stage=consistency cannot use objective={cfg.objective.name} with the {type(path.schedule).__name__}: "
                f"{problem}; {fix}"
            )
        cls, settings = ConsistencyModule, cfg.consistency
        keys = ("intervals", "target_decay", "loss", "teacher_solver")
        extra = {k: settings[k] for k in keys} | {"teacher": teacher.module if teacher is not None else None}
        extra["curriculum"] = consistency_curriculum(settings)
    try:
        model = FlowModel(
            net=net,
            path=path,
            objective=objective,
            data_shape=datamodule.data_shape,
            guidance=guidance,
            sampler=build_sampler_from(cfg.sampler, path),
            source=source,
            compile=bool(cfg.get("compile", False)),
            channels_last=bool(cfg.get("channels_last", False)),
            autocast_dtype=torch.bfloat16 if str(cfg.trainer.get("precision", "")).startswith("bf16") else None,
            data_moments=datamodule.data_moments,
        )
        module = cls(
            model,
            coupling=build_coupling(cfg),
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
            nan_policy=str(cfg.get("nan_policy", "stop")),
            **extra,
        )
    except ValueError as err:  # a stage setting out of range
        raise ConfigError(str(err)) from None
    if teacher is not None and settings.get("init_from_teacher", True):
        from flowdiff.checkpointing import check_weights_fit

        weights = teacher.module.net.state_dict()  # the teacher's EMA weights, when it had EMA
        check_weights_fit(module.net, {"state_dict": weights}, teacher.path, "teacher")  # the same net.* settings
        if objective.prediction != teacher.module.objective.prediction:
            raise ConfigError(
                f"stage={stage}: the teacher predicts {teacher.module.objective.prediction}, this run "
                f"{objective.prediction}, so its weights are no start: use the teacher's objective, or "
                f"{'coupling' if stage == 'reflow' else stage}.init_from_teacher=false"
            )
        module.net.load_state_dict(weights)
        if isinstance(module, ConsistencyModule):
            module.target_net.load_state_dict(weights)
    module.run_config = plain_dict(cfg)
    return module
