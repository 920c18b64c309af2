"""Configs stored in checkpoints by earlier flowdiff, in today's form.

Until the construction redesign (issue 18) objective, coupling, guidance, sampler and stage were chosen by a
``name:`` key and built by hand; reflow's settings lived in ``coupling``, distillation's in ``distill`` and
consistency's in ``consistency``. :func:`upgrade` rewrites such a config with ``_target_`` nodes, so that today's
builder reads every checkpoint the same way. The tables below are the old names, frozen: a new sampler or objective
never needs an entry here.
"""

from __future__ import annotations

from typing import Any

#: the samplers of the old ``sampler.name``, and whether they take the path at build time
_OLD_SAMPLER_CLASSES = {
    "euler": ("flowdiff.samplers.EulerSampler", False),
    "midpoint": ("flowdiff.samplers.MidpointSampler", False),
    "heun": ("flowdiff.samplers.HeunSampler", False),
    "rk4": ("flowdiff.samplers.RK4Sampler", False),
    "dopri5": ("flowdiff.samplers.Dopri5Sampler", False),
    "ddim": ("flowdiff.samplers.DDIMSampler", True),
    "euler_maruyama": ("flowdiff.samplers.EulerMaruyamaSampler", True),
    "consistency": ("flowdiff.samplers.ConsistencySampler", True),
}
_PREDICTIONS = {"cfm": "velocity", "score": "score", "noise": "noise", "data": "data"}


def _sampler(node: dict[str, Any]) -> dict[str, Any]:
    node = {k: v for k, v in node.items() if v is not None}
    target, needs_path = _OLD_SAMPLER_CLASSES[node.pop("name", "euler")]
    return {"_target_": target, **({"_partial_": True} if needs_path else {}), **node}


def upgrade(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a plain dict) in today's form; a config already in it comes back unchanged."""
    if "_target_" in cfg.get("objective", {}) or "name" not in cfg.get("objective", {}):
        return cfg
    cfg = dict(cfg)
    objective = dict(cfg["objective"])
    cfg["objective"] = {"_target_": "flowdiff.objectives.Objective", "prediction": _PREDICTIONS[objective.pop("name")]}
    cfg["objective"].update(objective)
    path = dict(cfg["path"])
    cfg["path"] = {"_target_": "flowdiff.paths.probability_path", "_partial_": True, **path}
    guidance = dict(cfg["guidance"])
    if guidance.pop("name") == "none":
        cfg["guidance"] = {}
    else:
        cfg["guidance"] = {"_target_": "flowdiff.guidance.ClassifierFreeGuidance", "_partial_": True, **guidance}
    cfg["choices"] = {"sampler": dict(cfg["sampler"]).get("name")}  # what sample.py reports the sampler as
    cfg["sampler"] = _sampler(dict(cfg["sampler"]))
    coupling = dict(cfg["coupling"])
    kind = coupling.pop("name")
    stage_name = (cfg.get("stage") or {}).get("name", "train")
    teacher = cfg.get("teacher")
    if kind == "reflow":
        stage_name, teacher = "reflow", coupling.pop("teacher", teacher)
        stage = {"_target_": "flowdiff.stages.ReflowStage", "teacher": teacher, **coupling}
        stage["sampler"] = _sampler(dict(coupling.get("sampler") or {"name": "dopri5"}))
        cfg["coupling"] = {"_target_": "flowdiff.stages.reflow.ReflowCoupling"}
    else:
        target = {"independent": "flowdiff.couplings.IndependentCoupling"}.get(
            kind, "flowdiff.couplings.MinibatchOTCoupling"
        )
        cfg["coupling"] = {"_target_": target, **coupling}
    if stage_name == "distill":
        settings = dict(cfg.pop("distill"))
        settings["sampler"] = _sampler(dict(settings.get("sampler") or {"name": "dopri5"}))
        stage = {"_target_": "flowdiff.stages.DistillStage", "teacher": teacher, **settings}
    elif stage_name == "consistency":
        settings = dict(cfg.pop("consistency"))
        curriculum = settings.pop("curriculum", None) or {
            "_target_": "flowdiff.stages.consistency.SongCurriculum",
            **{k: settings.pop(k) for k in ("s0", "s1", "mu0") if k in settings},
        }
        for k in ("s0", "s1", "mu0"):
            settings.pop(k, None)
        stage = {"_target_": "flowdiff.stages.ConsistencyStage", "teacher": teacher, **settings}
        stage["curriculum"] = curriculum
    elif stage_name == "train":
        stage = {"_target_": "flowdiff.stages.TrainStage"}
    cfg["stage"] = stage
    return cfg
