"""A trained model, sampled and scored: rebuilt from its checkpoint, sampled with any sampler (the command line's
edits on top of the trained one), its samples saved and drawn, and scored: W2 and straightness for 2D data, FID/KID
with their floors and class accuracy for images, the likelihood of held-out data by the probability-flow ODE. In a
multirun each job adds its row to the sweep's ``metrics.csv``."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from flowdiff import rules
from flowdiff.build import build, build_sampler, load_checkpoint, plain_dict
from flowdiff.callbacks.images import MIN_N, build_extractor, describe_sampler, sample_images
from flowdiff.data.images import to_uint8, to_unit
from flowdiff.errors import ConfigError, SettingError, check_setting
from flowdiff.labels import sampling_labels
from flowdiff.likelihood import bits_per_dim, dequantize, log_likelihood
from flowdiff.metrics import w2
from flowdiff.metrics.images import (
    MissingWeights,
    evaluation_settings,
    fid_report,
    kid_report,
    kid_subset_size,
    reference,
)
from flowdiff.plotting import plot_samples_2d, plt
from flowdiff.progress import progress


def explicit_sampler_keys() -> set[str] | None:
    """The ``sampler.*`` keys set on this command line (``None`` outside a Hydra run)."""
    if not HydraConfig.initialized():
        return None
    keys = set()
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("sampler."):
            keys.add(key.split(".", 1)[1])
    return keys


def resolve_sampler_config(train_cfg: DictConfig, override: DictConfig, explicit: set[str] | None = None) -> DictConfig:
    """The sampler to use: the training run's, edited by what the command line sets.

    Naming the sampler the model was trained with (``sampler=euler_maruyama`` on a ``lab2_score`` model) keeps its
    trained settings and changes only the keys in ``explicit`` (``sampler.steps=...``), not the defaults of that
    sampler's config file; naming another sampler starts from that file.
    """
    edits = {k: v for k, v in plain_dict(override).items() if v is not None}
    target = edits.get("_target_")
    if target not in (None, train_cfg.sampler.get("_target_")):
        return OmegaConf.create(edits)
    if target is not None and explicit is not None:
        edits = {k: v for k, v in edits.items() if k in explicit}
    return OmegaConf.create({**plain_dict(train_cfg.sampler), **edits})


def _sampler_name(train_cfg: DictConfig, sampler) -> str:
    """The sampler's config name: this command's ``sampler=<name>``, else the training run's, else its class."""
    chosen = HydraConfig.get().runtime.choices.get("sampler") if HydraConfig.initialized() else None
    return str(chosen or (train_cfg.get("choices") or {}).get("sampler") or type(sampler).__name__)


def sample(cfg: DictConfig) -> dict:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module, dm, train_cfg = load_checkpoint(cfg.ckpt, device, compile=cfg.get("compile", False))
    sampler_cfg = resolve_sampler_config(train_cfg, cfg.sampler, explicit_sampler_keys())
    sampler = build_sampler(sampler_cfg, module.path)
    rules.check_model(dm, module.path, module.objective, sampler, module.guidance)
    rules.check_coupling(dm, sampler, build(train_cfg.coupling, "coupling"))
    print(f"sampler: {sampler!r}")
    scale = cfg.guidance.get("scale")
    if scale is not None and module.guidance is None:
        raise ConfigError(
            "guidance.scale is set but this checkpoint was trained with guidance=none: drop guidance.scale"
        )
    n = int(cfg.n)
    if n < 1:
        raise ConfigError(f"n={n} is invalid: ask for at least one sample")
    nll_n = int(cfg.get("nll", {}).get("n", 0) or 0)
    if nll_n > 0:
        _check_nll(cfg.nll, dm)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "checkpoint": str(cfg.ckpt),
        "sampler": _sampler_name(train_cfg, sampler),
        "steps": sampler_cfg.get("steps"),
        "guidance_scale": scale if scale is not None else (module.guidance.scale if module.guidance else None),
        "n": n,
    }
    if dm.kind == "image":
        metrics.update(_sample_images(cfg, module, dm, sampler, sampler_cfg, scale, n, run_dir, device))
    elif dm.kind == "policy":
        metrics.pop("n")  # episodes, not samples
        metrics.update(_roll_out(cfg, module, dm, sampler, scale, run_dir))
    else:
        metrics.update(_sample_vectors(cfg, module, dm, sampler, sampler_cfg, scale, n, run_dir, device))
    if nll_n > 0:
        metrics.update(_likelihood(cfg, module, dm, nll_n, device))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    table = _append_row(metrics)
    for label, name in (("samples", "samples.pt"), ("metrics", "metrics.json")):
        if (run_dir / name).exists():
            print(f"{label}: {run_dir / name}")
    if table is not None:
        print(f"sweep table: {table}")
    return metrics


def _timed_sample(module, n, sampler, y, scale, seed: int, device: str, batch_size: int, what: str | None = None):
    """``n`` samples, their NFE and seconds; ``what`` names a progress bar over them (none for quick 2D draws)."""
    start = time.perf_counter()
    timings: list[tuple[int, float]] = []
    with progress(what or "", n if what else 0) as advance:
        x, nfe = sample_images(module, n, y, scale, seed, batch_size, sampler=sampler, advance=advance, timings=timings)
    if device != "cpu":
        torch.cuda.synchronize()
    if len(timings) > 1 and what:  # the first batch pays for compilation and autotuning
        rest = timings[1:]
        print(f"after the first batch: {sum(k for k, _ in rest) / sum(s for _, s in rest):.1f} images/s")
    return x, nfe, time.perf_counter() - start


def _straightness(cfg, module, y: torch.Tensor | None, scale, k: int) -> dict:
    """The straightness of the model's ODE itself (whatever sampler drew the samples) on ``k`` paths."""
    if k <= 0:
        return {}
    steps = int((cfg.get("straightness") or {}).get("steps", 100))
    g = torch.Generator().manual_seed(int(cfg.seed))
    labels = None if y is None else y[:k]
    slow = len(module.data_shape) == 3  # images: seconds to minutes; 2D: instant
    with progress(f"straightness ({k} paths)", steps if slow else 0, unit="steps") as advance:
        value = module.straightness(k, steps, labels, scale, generator=g, on_evaluation=advance)
    print(f"straightness: {value:.4f} (E int ||(X_1 - X_0) - v||^2 dt, {k} paths, {steps} steps)")
    return {"straightness": value, "straightness_n": k, "straightness_steps": steps}


def _sample_vectors(cfg, module, dm, sampler, sampler_cfg, scale, n, run_dir: Path, device: str) -> dict:
    ref = dm.test_set
    y = sampling_labels(n, module.num_classes, cfg.label, ref["y"])
    x, nfe, seconds = _timed_sample(module, n, sampler, y, scale, int(cfg.seed), device, batch_size=n)
    torch.save({"x": x, "y": y, "nfe": nfe, "sampler": plain_dict(sampler_cfg)}, run_dir / "samples.pt")
    m = min(n, len(ref["x1"]))
    out = {
        "nfe": nfe,
        "seconds": seconds,
        "w2": w2(x[:m], ref["x1"][:m]) if torch.isfinite(x).all() else float("inf"),
        "w2_floor": w2(dm.val_set["x1"][:m], ref["x1"][:m]),
        "w2_n": m,
    }
    out.update(_straightness(cfg, module, y, scale, min(n, int((cfg.get("straightness") or {}).get("n", 0) or 0))))
    title = f"{type(sampler).__name__}, NFE {nfe}, W2 {out['w2']:.3f} (floor {out['w2_floor']:.3f})"
    fig = plot_samples_2d(x, ref["x1"], title=title)
    fig.savefig(run_dir / "samples.png", dpi=90)
    plt.close(fig)
    print(title)
    print(f"plot: {run_dir / 'samples.png'}")
    return out


def _roll_out(cfg, module, dm, sampler, scale: float | None, run_dir: Path) -> dict:
    """A policy: ``rollout.n_episodes`` episodes from starts disjoint from the demonstrations (and from the training
    run's own evaluation starts), receding horizon; the success rate, steps, ms per chunk and a plot of the paths."""
    from flowdiff.policies.rollout import plot_rollouts, rollout

    rcfg = cfg.get("rollout") or {}
    episodes = int(rcfg.get("n_episodes", 50))
    check_setting("rollout.n_episodes", episodes, lambda v: v >= 1, "at least 1", whole=True)
    seed = dm.evaluation_seed(2 + int(cfg.seed))
    result = rollout(module, dm, episodes, seed, sampler, rcfg.get("n_action_steps"), scale)
    title = f"{type(sampler).__name__}, NFE {result['nfe']}: success {result['success_rate']:.0%} of {episodes}"
    plot_rollouts(result, run_dir / "rollouts.png", title)
    out = {k: float(result[k]) for k in ("success_rate", "steps_to_success", "ms_per_chunk", "wall_ms_per_chunk")}
    out.update(nfe=result["nfe"], episodes=episodes, expert_success_rate=dm.expert_success_rate)
    out.update({f"success_rate/{task}": rate for task, rate in result["per_task"].items()})
    print(
        f"{title} (the demonstrations' expert {dm.expert_success_rate:.0%}); {out['ms_per_chunk']:.1f} ms per chunk "
        f"(network), {out['wall_ms_per_chunk']:.1f} ms with the simulator"
    )
    print(f"plot: {run_dir / 'rollouts.png'}")
    return out


def _fid_n(cfg, dm, n: int) -> int | None:
    """The n of the FID and its floor (all ``n`` samples, against ``n`` training and ``n`` held-out images), or
    ``None`` with ``metrics.fid=false``; an ``n`` larger than either split is one sentence."""
    if dm.kind != "image" or not (cfg.get("metrics", {}) or {}).get("fid", True):
        return None
    if n < MIN_N:
        print(f"no FID for n={n}: FID and KID need at least {MIN_N} samples", flush=True)
        return None
    sizes = {split: dm.split_size(split) for split in ("train", "val")}
    if n > min(sizes.values()):
        raise ConfigError(
            f"n={n} is larger than data={dm.name} allows for FID: it compares the n samples with n of its "
            f"{sizes['train']} training images and its floor those with n of its {sizes['val']} held-out ones; set "
            f"n<={min(sizes.values())}, or metrics.fid=false to only sample"
        )
    return n


def _sample_images(cfg, module, dm, sampler, sampler_cfg, scale, n, run_dir: Path, device: str) -> dict:
    mcfg = cfg.get("metrics", {}) or {}
    fid_n = _fid_n(cfg, dm, n)
    y = sampling_labels(n, module.num_classes, cfg.label)
    batch = mcfg.get("batch_size")  # None: the largest that fits (sample_images)
    batch = None if batch is None else int(batch)
    w = scale if scale is not None else getattr(module.guidance, "scale", None)
    what = f"sampling {n} images ({describe_sampler(sampler, w)})"
    x, nfe, seconds = _timed_sample(module, n, sampler, y, scale, int(cfg.seed), device, batch, what)
    torch.save({"x": to_uint8(x), "y": y, "nfe": nfe, "sampler": plain_dict(sampler_cfg)}, run_dir / "samples.pt")
    k = min(n, 100 if y is None else 10 * dm.num_classes)
    order = torch.argsort(y[:k], stable=True) if y is not None else torch.arange(k)
    nrow = 10 if y is not None else int(k**0.5)
    save_image(make_grid(to_unit(x[:k][order]), nrow=nrow, padding=2, pad_value=1.0), run_dir / "samples.png")
    out: dict = {"nfe": nfe, "seconds": seconds, "images_per_second": n / seconds}
    print(f"{sampler!r}: {n} images, NFE {nfe}, {seconds:.1f} s ({n / seconds:.1f} images/s)")
    print(f"grid: {run_dir / 'samples.png'}")
    out.update(_straightness(cfg, module, y, scale, min(n, int((cfg.get("straightness") or {}).get("images", 0) or 0))))
    if fid_n is None:
        return out
    try:
        extractor, classifier = build_extractor(
            mcfg.get("features", "auto"), dm, mcfg.get("inception_weights"), mcfg.get("classifier_path")
        )
    except MissingWeights as err:
        raise ConfigError(str(err)) from None
    subsets = int(mcfg.get("kid_subsets", 100))
    print(evaluation_settings(fid_n, subsets, extractor.name), flush=True)
    dev = torch.device(device)
    real, _ = dm.real_images(fid_n, "train")
    held_out, _ = dm.real_images(fid_n, "val")
    with progress("FID/KID features", 3 * fid_n) as advance:
        metric, floor = reference(extractor.to(dev), real, held_out, subsets, n=fid_n, advance=advance)
        metric.update(x, real=False, advance=advance)
    scores = metric.compute(fid_n)
    out.update(
        fid=scores["fid"],
        kid=scores["kid"],
        kid_std=scores["kid_std"],
        fid_floor=floor["fid"],
        kid_floor=floor["kid"],
        kid_floor_std=floor["kid_std"],
        fid_n=fid_n,
        kid_subset_size=kid_subset_size(fid_n),
        features=extractor.name,
    )
    print(fid_report(scores["fid"], floor["fid"], fid_n, extractor.name))
    print(kid_report(scores, floor, fid_n, subsets))
    if classifier is not None and y is not None:
        out["class_acc"] = float((classifier.to(dev).predict(x) == y).float().mean())
        print(f"class accuracy of the samples (classifier's labels vs the requested ones): {out['class_acc']:.3f}")
    return out


def _check_nll(lcfg, dm) -> None:
    """The likelihood's settings, before anything is sampled: each out of range is one sentence naming its key."""
    if not dm.gaussian_source:
        raise ConfigError(
            f"nll.n={lcfg.n} needs the density of the source, but this model flows from data.source={dm.source_name}: "
            "drop nll.n"
        )
    try:
        check_setting("rtol", lcfg.get("rtol", 1e-5), lambda v: v > 0, "a positive relative tolerance, such as 1e-5")
        check_setting("atol", lcfg.get("atol", 1e-5), lambda v: v > 0, "a positive absolute tolerance, such as 1e-5")
        check_setting("probes", lcfg.get("probes", 1), lambda v: v >= 1, "at least 1 Hutchinson probe", whole=True)
        check_setting("batch_size", lcfg.get("batch_size", 250), lambda v: v >= 1, "at least 1", whole=True)
    except SettingError as err:
        raise ConfigError(f"nll.{err}") from None


def _likelihood(cfg, module, dm, n: int, device: str) -> dict:
    """Mean negative log-likelihood of ``n`` held-out points (bits/dim for images) by the probability-flow ODE, from
    the distribution the model's sampler starts from (:meth:`FlowModule.start_log_prob`) over its sampling range."""
    lcfg = cfg.nll
    g = torch.Generator().manual_seed(int(cfg.seed))
    if dm.kind == "image":
        x, _ = dm.real_images(n, "val")
        x = dequantize(x, g)
    else:
        x = dm.test_set["x1"][:n]
    x = x.to(device)
    velocity = module.vector_fields().velocity
    t_span = module.objective.sample_time_range(module.path)
    exact = None if lcfg.get("exact") is None else bool(lcfg.exact)
    dims = x[0].numel()
    divergence = (
        "exact" if (exact if exact is not None else dims <= 16) else f"Hutchinson, {lcfg.get('probes', 1)} probe(s)"
    )
    prior = "N(0, I)" if t_span[0] == 0 else "the moment-matched Gaussian of p_t0 (what sampling starts from)"
    span = f"t in [{t_span[0]:g}, {t_span[1]:g}] from {prior}"
    if t_span[1] < 1:
        span += f"; the data is scored as the ODE's state at t = {t_span[1]:g} (the final denoising step is not in it)"
    print(f"NLL of {len(x)} held-out points by the probability-flow ODE (dopri5, {divergence}): {span}", flush=True)
    batch = int(lcfg.get("batch_size", 250))
    parts, nfe = [], 0
    with progress("NLL", len(x), unit="points") as advance:
        for i in range(0, len(x), batch):
            lp, nfe = log_likelihood(
                velocity,
                x[i : i + batch],
                t_span,
                exact=exact,
                probes=int(lcfg.get("probes", 1)),
                rtol=float(lcfg.get("rtol", 1e-5)),
                atol=float(lcfg.get("atol", 1e-5)),
                generator=g,
                prior=lambda x0: module.start_log_prob(x0, t_span[0]),
            )
            parts.append(lp.cpu())
            advance(len(lp))
    log_prob = torch.cat(parts)
    out = {
        "nll": float(-log_prob.mean()),
        "nll_n": len(log_prob),
        "nll_nfe": nfe,
        "nll_divergence": divergence,
        "nll_t_span": list(t_span),
        "nll_prior": prior,
        "nll_note": span,
    }
    if dm.kind == "image":
        out["bits_per_dim"] = float(bits_per_dim(log_prob, dims).mean())
        out["dequantisation"] = "uniform: x = 2 (pixel + U) / 256 - 1"
        n_img = len(log_prob)
        print(
            f"NLL: {out['bits_per_dim']:.3f} bits/dim on {n_img} held-out images ({divergence}, uniform dequantisation)"
        )
    else:
        target = getattr(dm.target, "mixture", None)
        if target is not None:
            out["nll_exact"] = float(-target.log_prob(x.cpu().double()).mean())
        exact_txt = f" (exact density: {out['nll_exact']:.4f})" if "nll_exact" in out else ""
        print(f"NLL: {out['nll']:.4f} nats per point on {len(log_prob)} test points{exact_txt}")
    return out


ROW_KEYS = (
    "sampler",
    "steps",
    "guidance_scale",
    "n",
    "nfe",
    "seconds",
    "w2",
    "w2_floor",
    "straightness",
    "fid",
    "fid_floor",
    "kid",
    "kid_std",
    "kid_floor",
    "kid_floor_std",
    "class_acc",
    "nll",
    "bits_per_dim",
    "features",
    "checkpoint",
)


def _append_row(metrics: dict) -> Path | None:
    """In a multirun, add this job's row to ``<sweep dir>/metrics.csv`` (one row per job)."""
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return None
    table = Path(HydraConfig.get().sweep.dir) / "metrics.csv"
    job = HydraConfig.get().job.override_dirname
    row = io.StringIO()
    writer = csv.writer(row)
    if not table.exists():
        writer.writerow(["job", *ROW_KEYS])
    writer.writerow([job, *(metrics.get(k, "") for k in ROW_KEYS)])
    with open(table, "a") as fh:  # one write per job: rows of parallel jobs do not interleave
        fh.write(row.getvalue())
    return table
