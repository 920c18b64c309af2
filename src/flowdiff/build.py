"""From a composed config to the run's objects: every one built by Hydra's ``instantiate`` from its ``_target_``.

A node whose object needs something only known at build time says ``_partial_: true`` and gets it here, by name:
the path (``gaussian_source``: the data's), the guidance (``null_label``: the network's), the samplers that need it
(``path``), the optimiser (the parameters). :func:`build_run` is a training run (stage, data, model, module),
:func:`load_checkpoint` a trained model read back from its checkpoint alone. Every failure to build is one sentence
(:class:`ConfigError`) naming the key.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from omegaconf import DictConfig, OmegaConf, open_dict

import flowdiff.configs  # noqa: F401  (the ${default:} resolver of the config files)
from flowdiff import rules
from flowdiff.callbacks import CheckpointOnSignal, ImageMetrics
from flowdiff.callbacks.last_step import ValidateLastStep
from flowdiff.checkpointing import check_weights_fit, read_checkpoint
from flowdiff.compat import upgrade
from flowdiff.configs import multirun
from flowdiff.errors import ConfigError, DataError, SettingError
from flowdiff.model import FlowModel
from flowdiff.module import FlowModule


def plain_dict(cfg: DictConfig | dict | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return dict(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else dict(cfg)


def build(node: DictConfig, key: str, factory: bool = False, **at_build_time) -> Any:
    """``instantiate(node)``; a ``_partial_`` result is called with the ``at_build_time`` arguments, unless it is a
    ``factory`` for later (an optimiser, which the module calls with its parameters). A setting out of its range is
    one sentence naming ``key.<setting>``; any other refusal of the class, one sentence prefixed by ``key``."""
    try:
        built = instantiate(node)
        if isinstance(built, functools.partial) and not factory:
            built = built(**at_build_time)
        return built
    except InstantiationException as err:  # Hydra wraps what the constructor raised
        nested = re.search(r"full_key: (\S+)", str(err))  # a node inside this one (stage.sampler)
        sentence = _one_sentence(err.__cause__, nested.group(1) if nested else key)
        if sentence is None:  # not a refusal of a setting (a target that is not there, a bug): Hydra's own error
            raise
        raise sentence from None
    except (SettingError, ConfigError, ValueError) as err:  # a partial's call
        raise _one_sentence(err, key) from None


def _one_sentence(err: BaseException | None, key: str) -> ConfigError | None:
    if isinstance(err, TypeError) and "unexpected keyword argument" in str(err):  # a misspelt +key
        return ConfigError(f"{key}: {err}: check the spelling of the key")
    if isinstance(err, SettingError):
        return ConfigError(f"{key}.{err}")
    if isinstance(err, ConfigError):
        return err
    if isinstance(err, ValueError):
        return ConfigError(f"{key}: {err}")
    return None


def build_datamodule(cfg: DictConfig):
    """``cfg.data``; unreadable or missing data is one sentence."""
    try:
        return instantiate(cfg.data)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, (DataError, ConfigError)):  # e.g. data=metaworld without the robot extra
            raise ConfigError(str(cause)) from None
        raise


def build_net(cfg: DictConfig, data_shape: tuple[int, ...], num_classes: int, context_dim: int = 0) -> torch.nn.Module:
    """``cfg.net`` for data of ``data_shape`` (and a context of ``context_dim``, policies' observations); a net that
    does not fit the data is one sentence."""
    extra = {"context_dim": context_dim} if context_dim else {}
    try:
        return instantiate(cfg.net, data_shape=list(data_shape), num_classes=num_classes, **extra)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        if context_dim and isinstance(cause, TypeError) and "context_dim" in str(cause):
            raise ConfigError(
                f"net={cfg.net._target_.rsplit('.', 1)[-1]} takes no context, and this data conditions on one: use "
                "net=policy_mlp or net=policy_unet1d"
            ) from None
        raise


#: the config files of a source checkout (what train.py and sample.py compose from)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def conf_node(group: str, name: str, **settings) -> DictConfig:
    """``conf/<group>/<name>.yaml`` with ``settings`` on top: a group's choice as the command line would make it,
    for code that builds one object without composing a whole config (tests, benchmarks)."""
    return OmegaConf.merge(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), settings)


def build_sampler(node: DictConfig, path, key: str = "sampler"):
    """The sampler of the config node ``key`` (``sampler``, ``stage.sampler``), built with ``path`` if it needs it."""
    return build(node, key, path=path)


def build_model(cfg: DictConfig, datamodule) -> FlowModel:
    """The model of ``cfg`` for ``datamodule``'s data: its shape and classes size the network, its source decides the
    path, its moments give the start of a sampler that starts at t0 > 0."""
    path = build(cfg.path, "path", gaussian_source=datamodule.gaussian_source)
    objective = build(cfg.objective, "objective")
    guided = "_target_" in cfg.guidance
    context_dim = getattr(datamodule, "context_dim", 0)
    net = build_net(cfg, datamodule.data_shape, datamodule.num_classes if guided else 0, context_dim)
    guidance = build(cfg.guidance, "guidance", null_label=net.null_label) if guided else None
    source = None if datamodule.gaussian_source else datamodule.source.points  # a distribution's, not the datamodule's
    sampler = build_sampler(cfg.sampler, path)
    rules.check_model(datamodule, path, objective, sampler, guidance)
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="") or "")
    return FlowModel(
        net=net,
        path=path,
        objective=objective,
        data_shape=datamodule.data_shape,
        guidance=guidance,
        sampler=sampler,
        source=source,
        compile=cfg.get("compile", False),
        channels_last=bool(cfg.get("channels_last", False)),
        autocast_dtype=torch.bfloat16 if precision.startswith("bf16") else None,
        data_moments=datamodule.data_moments,
    )


def named_on_command_line() -> set[str]:
    """The config keys the command line sets (``data``, ``data.batch_size``, ...); empty outside a Hydra run."""
    if not HydraConfig.initialized():
        return set()
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]
        keys.add(key)
    return keys


def build_run(cfg: DictConfig) -> tuple[FlowModule, Any]:
    """The LightningModule and datamodule of a training run: the stage first (it may take its teacher's data, net,
    path and guidance into ``cfg``), then the data, the model, the coupling, the rules, the module and its start."""
    stage = build(cfg.stage, "stage")
    stage.configure(cfg, named_on_command_line())
    datamodule = stage.datamodule(build_datamodule(cfg))
    rules.check_values(cfg, datamodule)
    model = build_model(cfg, datamodule)
    configured = build(cfg.coupling, "coupling")
    coupling = stage.coupling(configured)
    rules.check_coupling(datamodule, model.sampler, coupling)
    stage.check(datamodule, model, coupling)
    try:
        module = stage.module_class(
            model,
            coupling=coupling,
            optimizer=build(cfg.optimizer, "optimizer", factory=True),
            scheduler=build(cfg.scheduler, "scheduler", factory=True) if cfg.get("scheduler") else None,
            nan_policy=str(cfg.get("nan_policy", "stop")),
            **stage.module_kwargs(),
        )
    except ValueError as err:  # a stage setting out of range
        raise ConfigError(str(err)) from None
    except TypeError as err:  # a stage setting its module does not have (a misspelt +stage.<key>)
        sentence = _one_sentence(err, "stage")
        if sentence is None:
            raise
        raise sentence from None
    stage.initialise(module)
    module.run_config = plain_dict(cfg)
    if coupling is not configured:  # the checkpoint records the pairing trained on (sample.py's rules ask it)
        module.run_config["coupling"] = {"_target_": f"{type(coupling).__module__}.{type(coupling).__qualname__}"}
    if HydraConfig.initialized():  # the sampler's name, for what sample.py reports
        module.run_config["choices"] = {"sampler": HydraConfig.get().runtime.choices.get("sampler")}
    return module, datamodule


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", compile: bool | str = False):
    """``(model, datamodule, config)``: the trained :class:`FlowModel` (its network's weights: the EMA average when
    EMA was on), rebuilt from a checkpoint alone, its data and its training config (in today's form, whatever
    flowdiff wrote it). ``compile`` replaces the training run's (sampling shapes differ; off by default)."""
    ckpt = read_checkpoint(path, "ckpt")
    cfg = OmegaConf.create(upgrade(ckpt["flowdiff_config"]))
    cfg.compile = compile
    datamodule = build_datamodule(cfg)  # a student of a stage samples without its teacher
    model = build_model(cfg, datamodule)
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    check_weights_fit(model, {"state_dict": weights}, path, "ckpt")
    model.load_state_dict(weights)
    state = ckpt.get(type(datamodule).__qualname__)  # Lightning's key for the datamodule's state_dict()
    if state is None:  # a student of a stage: its data's state within the pairs' (load_checkpoint builds the data)
        state = (ckpt.get("PairsDataModule") or {}).get("base")
    if state and hasattr(datamodule, "load_state_dict"):
        datamodule.load_state_dict(state)  # e.g. a policy's normalisation: rollouts apply what training used
    return model.to(device).eval(), datamodule, cfg


def build_callbacks(cfg: DictConfig, datamodule=None) -> list[L.Callback]:
    """Instantiate ``cfg.callbacks`` (entries set to null are off), in the order below.

    Callbacks made for one kind of data (``data_kinds``: the 2D plot and W2 for vectors, grids and FID for
    images) are dropped for the other, so one callback config serves both. Image metrics are checked against the
    data now (a missing weights file is one sentence, not an error after the first epoch); ones that cannot be
    computed and were not asked for explicitly are dropped with a line saying so.
    """
    data_kind = getattr(datamodule, "kind", None)
    specs = {k: v for k, v in (cfg.get("callbacks") or {}).items() if v is not None}
    for name, spec in specs.items():
        if "_target_" not in spec:
            raise ConfigError(
                f"callbacks.{name} has settings but no _target_: set callbacks.{name}=null or give it one"
            )
    # EMA after the callbacks that sample in validation (they must see its average before it swaps back), and the
    # checkpoint writers after EMA (a checkpoint of step N holds EMA's update of step N: resumes are exact)
    callbacks = sorted(
        (build(spec, f"callbacks.{name}") for name, spec in specs.items()),
        key=lambda c: 2 if isinstance(c, (ModelCheckpoint, CheckpointOnSignal)) else isinstance(c, WeightAveraging),
    )
    callbacks = [c for c in callbacks if data_kind is None or data_kind in getattr(c, "data_kinds", (data_kind,))]
    callbacks = [c for c in callbacks if datamodule is None or not isinstance(c, ImageMetrics) or c.check(datamodule)]
    # the metrics the kept callbacks compute, each with the way that is better (the first: the data's headline)
    monitors = [m for c in callbacks for m in getattr(c, "monitors", {}).items()]
    headline = monitors[0] if monitors and data_kind is not None else None
    for c in callbacks:
        if not isinstance(c, ModelCheckpoint):
            continue
        if c.monitor == "auto":  # the headline metric of the data kind, if a callback computes it
            c.monitor = headline[0] if headline else None
            c.save_top_k = c.save_top_k if headline else 1
            mode = headline[1] if headline else c.mode
            if mode != c.mode:  # Lightning sets the mode's starting value when it builds the callback
                c.mode, c.kth_value = mode, torch.tensor(-torch.inf if mode == "max" else torch.inf)
        better = dict(monitors).get(c.monitor)
        if better is not None and better != c.mode:
            raise ConfigError(
                f"callbacks.checkpoint.mode={c.mode} would keep the worst {c.monitor} "
                f"({'larger' if better == 'max' else 'smaller'} is better): set callbacks.checkpoint.mode={better}"
            )
    return callbacks + [ValidateLastStep()]


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for spec in (cfg.get("logger") or {}).values():
        if spec is None:
            continue
        if "WandbLogger" in spec.get("_target_", ""):
            with open_dict(spec):
                if multirun():
                    hc = HydraConfig.get()
                    spec.group = spec.group or Path(hc.sweep.dir).name
                    spec.name = spec.name or (hc.job.override_dirname or f"job{hc.job.num}")
        loggers.append(instantiate(spec))
    return loggers
