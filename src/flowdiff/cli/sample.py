"""``python sample.py ckpt=...``: rebuild a trained model from its checkpoint and sample it with any sampler."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from flowdiff.cli.build import ConfigError, build_datamodule, build_module, build_sampler_from, plain_dict, validate
from flowdiff.metrics import w2
from flowdiff.plotting import plot_samples_2d, plt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """The :class:`FlowModule`, its datamodule and training config, rebuilt from a checkpoint alone."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ckpt={path} does not exist: pass the path of a .ckpt written by train.py")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "flowdiff_config" not in ckpt:
        raise ConfigError(f"ckpt={path} carries no flowdiff config: it was not written by train.py")
    train_cfg = OmegaConf.create(ckpt["flowdiff_config"])
    datamodule = build_datamodule(train_cfg)
    module = build_module(train_cfg, datamodule)
    module.load_state_dict(ckpt["state_dict"])  # EMA weights when EMA was on (Lightning stores the average)
    return module.to(device).eval(), datamodule, train_cfg


def resolve_sampler_config(train_cfg: DictConfig, override: DictConfig) -> DictConfig:
    """A named sampler replaces the training one; otherwise the non-null fields edit it."""
    edits = {k: v for k, v in plain_dict(override).items() if v is not None}
    base = {} if edits.get("name") not in (None, train_cfg.sampler.name) else plain_dict(train_cfg.sampler)
    return OmegaConf.create({**base, **edits})


def sample(cfg: DictConfig) -> dict:
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module, dm, train_cfg = load_checkpoint(cfg.ckpt, device)
    sampler_cfg = resolve_sampler_config(train_cfg, cfg.sampler)
    validate(OmegaConf.merge(train_cfg, {"sampler": sampler_cfg}), dm)
    sampler = build_sampler_from(sampler_cfg, module.path)
    scale = cfg.guidance.get("scale")
    if scale is not None and module.guidance is None:
        raise ConfigError(
            "guidance.scale is set but this checkpoint was trained with guidance=none: drop guidance.scale"
        )
    ref = dm.test_set
    n = int(cfg.n)
    y = None
    if module.guidance is not None:
        y = (
            torch.full((n,), int(cfg.label))
            if cfg.label is not None
            else ref["y"][:n].repeat(n // len(ref["y"]) + 1)[:n]
        )
    start = time.perf_counter()
    result = module.sample(
        n, sampler=sampler, y=y, guidance_scale=scale, generator=torch.Generator().manual_seed(int(cfg.seed))
    )
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    x = result.x.cpu()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y, "nfe": result.nfe, "sampler": plain_dict(sampler_cfg)}, run_dir / "samples.pt")
    m = min(n, len(ref["x1"]))
    metrics = {
        "checkpoint": str(cfg.ckpt),
        "sampler": sampler_cfg.name,
        "steps": sampler_cfg.get("steps"),
        "guidance_scale": scale if scale is not None else (module.guidance.scale if module.guidance else None),
        "n": n,
        "nfe": result.nfe,
        "seconds": seconds,
        "w2": w2(x[:m], ref["x1"][:m]) if torch.isfinite(x).all() else float("inf"),
        "w2_floor": w2(dm.val_set["x1"][:m], ref["x1"][:m]),
        "w2_n": m,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"{sampler_cfg.name}, NFE {result.nfe}, W2 {metrics['w2']:.3f} (floor {metrics['w2_floor']:.3f})"
    fig = plot_samples_2d(x, ref["x1"], title=title)
    fig.savefig(run_dir / "samples.png", dpi=90)
    plt.close(fig)
    print(title)
    for label, name in (("samples", "samples.pt"), ("plot", "samples.png"), ("metrics", "metrics.json")):
        print(f"{label}: {run_dir / name}")
    return metrics


def main(cfg: DictConfig) -> float:
    try:
        return sample(cfg)["w2"]
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
