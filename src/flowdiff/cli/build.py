"""Turn a composed Hydra config into data, path, objective, sampler and module; refuse nonsense early.

Every invalid combination stops here with one sentence that names the fix (:class:`ConfigError`),
before any Lightning machinery starts.
"""

from __future__ import annotations

from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flowdiff.couplings import Coupling, IndependentCoupling, MinibatchOTCoupling
from flowdiff.data.images import DataError
from flowdiff.data.pairs import PairsDataModule
from flowdiff.errors import ConfigError
from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.module import FlowModule
from flowdiff.objectives import Objective
from flowdiff.paths import GaussianPath, NoisyInterpolantPath
from flowdiff.reflow import ReflowCoupling, load_or_make_pairs
from flowdiff.samplers import SAMPLERS, Sampler, build_sampler


def plain_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return dict(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else dict(cfg)


def build_datamodule(cfg: DictConfig, training: bool = True):
    """``cfg.data``; unreadable or missing data is one sentence (:class:`ConfigError`). With ``coupling=reflow``
    and ``training``, the training batches are the teacher's pairs (:class:`PairsDataModule`, drawn when training
    starts); a trained student samples without its teacher (``training=False``)."""
    try:
        datamodule = instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, DataError):
            raise ConfigError(str(cause)) from None
        raise
    if cfg.coupling.name != "reflow" or not training:
        return datamodule
    rc = cfg.coupling
    teacher, teacher_dm, _ = load_teacher(rc.teacher)  # a missing or foreign teacher, or other data: one sentence now

    def make_pairs():
        sampler = build_sampler_from(rc.sampler, teacher.path)
        pairs, _ = load_or_make_pairs(
            rc.teacher,
            teacher,
            sampler,
            plain_dict(rc.sampler),
            int(rc.n_pairs),
            rc.cache_dir,
            int(rc.get("batch_size", 5000)),
            int(cfg.seed),
        )
        return pairs

    if (teacher_dm.name, tuple(teacher_dm.data_shape)) != (datamodule.name, tuple(datamodule.data_shape)):
        raise ConfigError(
            f"coupling=reflow: the teacher was trained on data={teacher_dm.name} {tuple(teacher_dm.data_shape)}, "
            f"this run is on data={datamodule.name} {tuple(datamodule.data_shape)}: use the teacher's data"
        )
    steps = getattr(datamodule, "steps_per_epoch", None)
    return PairsDataModule(datamodule, make_pairs, int(cfg.data.batch_size), steps, int(cfg.seed), teacher)


def load_teacher(path: str):
    """The teacher of a reflow run: ``(module, datamodule, config)`` from its checkpoint."""
    from flowdiff.cli.sample import load_checkpoint  # sample.py's reader: one sentence for a bad file

    try:
        return load_checkpoint(path)
    except ConfigError as err:
        raise ConfigError(f"coupling.teacher: {err}") from None


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


def build_sampler_from(sampler_cfg: DictConfig | dict, path) -> Sampler:
    kw = plain_dict(sampler_cfg)
    return build_sampler(kw.pop("name"), path=path, **{k: v for k, v in kw.items() if v is not None})


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
        ("sampler.steps", lambda v: v >= 1, "at least 1 (a sampler needs at least one step)"),
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
    if not gaussian and sampler in ("ddim", "euler_maruyama"):
        raise ConfigError(
            f"sampler={sampler} needs a Gaussian path (a score), but the source is not Gaussian or path.sigma > 0: "
            "use an ODE sampler such as sampler=euler"
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


def build_net(cfg: DictConfig, data_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    """``cfg.net`` for data of ``data_shape``; a net that does not fit the data is one sentence."""
    try:
        return instantiate(cfg.net, data_shape=list(data_shape), num_classes=num_classes)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        raise


def build_module(cfg: DictConfig, datamodule) -> FlowModule:
    """The :class:`FlowModule` for ``cfg`` (validated first); the network's sizes come from the data. A reflow run
    being trained (its datamodule holds the teacher) starts from the teacher's weights
    (``coupling.init_from_teacher``)."""
    validate(cfg, datamodule)
    path = build_path(cfg, datamodule.gaussian_source)
    conditional = cfg.guidance.name != "none"
    net = build_net(cfg, datamodule.data_shape, datamodule.num_classes if conditional else 0)
    guidance = build_guidance(cfg, net)
    source = None
    if not datamodule.gaussian_source:
        toy = datamodule.source  # a distribution object, not the datamodule

        def source(n, generator=None):
            return toy.sample(n, generator)[0]

    module = FlowModule(
        net=net,
        path=path,
        objective=build_objective(cfg),
        data_shape=datamodule.data_shape,
        coupling=build_coupling(cfg),
        guidance=guidance,
        sampler=build_sampler_from(cfg.sampler, path),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        source=source,
        compile=bool(cfg.get("compile", False)),
        channels_last=bool(cfg.get("channels_last", False)),
        autocast_dtype=torch.bfloat16 if str(cfg.trainer.get("precision", "")).startswith("bf16") else None,
        data_moments=datamodule.data_moments,
        nan_policy=str(cfg.get("nan_policy", "stop")),
    )
    teacher = getattr(datamodule, "teacher", None)  # a reflow run's, loaded by build_datamodule
    if teacher is not None and cfg.coupling.get("init_from_teacher", True):
        from flowdiff.checkpointing import check_weights_fit

        weights = {"state_dict": teacher.state_dict()}  # the teacher's EMA weights, when it had EMA
        check_weights_fit(module, weights, cfg.coupling.teacher, "coupling.teacher")  # the same net.* settings
        module.load_state_dict(weights["state_dict"])
    module.run_config = plain_dict(cfg)
    return module
