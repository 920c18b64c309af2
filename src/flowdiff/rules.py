"""The combinations that cannot work, and the values out of range, refused before training in one sentence each.

The rules ask the built objects what they are, never the names of the choices: a sampler says whether it draws
noise (``stochastic``) and which fields it evaluates (``fields``), an objective what it predicts, a path which
parameterisations it converts (``parameterisations``), a coupling whether it keeps the noise independent of the data
(``independent``). Adding a sampler, objective, coupling or path is one class and one config file; no list of names
is edited here. The stages' own rules live with them (:meth:`flowdiff.stages.base.Stage.check`). Messages quote the
command line's choices where Hydra knows them (:func:`chosen`).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from flowdiff.errors import ConfigError
from flowdiff.nonfinite import SKIP_UNDER_DDP


def chosen(group: str, fallback: str) -> str:
    """``group=<the choice>`` as the command line or the defaults made it (``sampler=heun``), else ``fallback``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    return fallback


def _number(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, default=None)
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} is not a number: set {key} to one")
    return value


#: settings of classes flowdiff does not own (Lightning's trainer, torch's optimiser, the data's loaders): key, test,
#: what the value must be. flowdiff's own classes check their settings where they are built.
VALUE_RULES = [
    ("trainer.max_steps", lambda v: v >= 1 or v == -1, "a positive number of training steps"),
    ("data.batch_size", lambda v: v >= 1, "at least 1"),
    ("optimizer.lr", lambda v: v > 0, "a positive learning rate, such as 1e-3"),
    ("optimizer.weight_decay", lambda v: v >= 0, "0 or more"),
    ("trainer.gradient_clip_val", lambda v: v > 0, "a positive norm, or null for no clipping"),
    ("callbacks.last_checkpoint.every_n_train_steps", lambda v: v >= 1, "at least 1"),
]


def check_values(cfg: DictConfig, datamodule) -> None:
    """Out-of-range values of settings flowdiff does not own, each one sentence naming the key and its range."""
    rules = list(VALUE_RULES)
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
    if cfg.get("nan_policy") == "skip" and "ddp" in str(cfg.get("trainer", {}).get("strategy", "")):
        raise ConfigError(SKIP_UNDER_DDP)  # now, not when the DDP processes have started (the guard checks then)


def check_model(datamodule, path, objective, sampler, guidance) -> None:
    """The choices of a model that cannot work together, asked of the built data, path, objective, sampler and
    guidance."""
    if guidance is not None and datamodule.num_classes == 0 and not getattr(datamodule, "context_dim", 0):
        raise ConfigError(
            f"{chosen('guidance', 'guidance')} needs labelled data, but data={datamodule.name} has no labels: "
            "use guidance=none or a labelled dataset"
        )
    why = f"data.source={datamodule.source_name}" if not datamodule.gaussian_source else "path.sigma > 0"
    if objective.prediction not in path.parameterisations:
        raise ConfigError(
            f"{chosen('objective', objective.prediction + ' objective')} needs a Gaussian source with path.sigma=0, "
            f"but {why}: use objective=cfm"
        )
    missing = {*sampler.fields, *sampler.conversions} - set(path.parameterisations)
    if missing or (sampler.stochastic and "score" not in path.parameterisations):
        raise ConfigError(
            f"{chosen('sampler', type(sampler).__name__)} needs a Gaussian path (a score or data prediction), but "
            f"{why}: use an ODE sampler such as sampler=euler"
        )


def check_coupling(datamodule, sampler, coupling) -> None:
    """A coupling that pairs noise with data cannot serve a sampler that draws noise; label-wise pairing needs
    labels. A stage's own pairing (reflow's, ``made_by`` it) leaves the sampler as the fix."""
    if sampler.stochastic and not coupling.independent:
        name = chosen("sampler", type(sampler).__name__)
        if coupling.made_by is not None:
            raise ConfigError(
                f"{name} needs the score, which {coupling.made_by} does not define (its noise is paired "
                "with the data): use an ODE sampler such as sampler=euler"
            )
        raise ConfigError(
            f"{name} needs the score, whose formula -E[eps | x_t] / beta_t assumes noise drawn independently of the "
            f"data, which {chosen('coupling', type(coupling).__name__)} is not: use coupling=independent, or an ODE "
            "sampler (ddim with eta=0 is one)"
        )
    if getattr(coupling, "by_label", False) and datamodule.num_classes == 0:
        raise ConfigError(f"coupling.by_label=true needs labelled data, but data={datamodule.name} has none")
