"""The Lightning + Hydra framework: every config combination, the module's contracts, training to a W2 bound."""

import itertools
import json

import pytest
import torch
from hydra.utils import instantiate

from flowdiff.cli.build import ConfigError, build_datamodule, build_module, build_sampler_from
from flowdiff.cli.train import train
from helpers import CONF, FAST, compose_cfg

PATHS = sorted(p.stem for p in (CONF / "path").glob("*.yaml"))
OBJECTIVES = sorted(p.stem for p in (CONF / "objective").glob("*.yaml"))
SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))
GUIDANCE = sorted(p.stem for p in (CONF / "guidance").glob("*.yaml"))


def test_config_groups_are_complete():
    assert PATHS == ["condot", "cosine", "linear_vp", "polynomial", "sqrt"]
    assert OBJECTIVES == ["cfm", "data", "noise", "score"]
    assert SAMPLERS == ["ddim", "dopri5", "euler", "euler_maruyama", "heun", "midpoint", "rk4"]
    assert GUIDANCE == ["cfg", "none"]


@pytest.mark.parametrize("path,objective", list(itertools.product(PATHS, OBJECTIVES)))
def test_every_combination_composes_trains_and_samples(path, objective, tmp_path):
    """All path x objective x sampler x guidance files: compose, three optimiser steps, a finite sample."""
    dm = None
    for sampler, guidance in itertools.product(SAMPLERS, GUIDANCE):
        cfg = compose_cfg(
            [
                f"path={path}",
                f"objective={objective}",
                f"sampler={sampler}",
                f"guidance={guidance}",
                "data=8gaussians",
                "sampler.steps=4",
            ],
            tmp_path,
        )
        dm = dm or build_datamodule(cfg)
        module = build_module(cfg, dm)
        opt = module.configure_optimizers()
        before = [p.detach().clone() for p in module.parameters()]
        for _ in range(3):
            loss = module.loss(dm.draw(64))
            assert torch.isfinite(loss), (path, objective, sampler, guidance)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
        y = torch.randint(0, 8, (32,)) if guidance == "cfg" else None
        out = module.sample(32, y=y, guidance_scale=2.0 if y is not None else None)
        assert out.x.shape == (32, 2) and torch.isfinite(out.x).all(), (path, objective, sampler, guidance)


def test_cfg_makes_one_forward_per_evaluation(tmp_path):
    cfg = compose_cfg(["guidance=cfg", "data=8gaussians", "sampler=heun", "sampler.steps=5"], tmp_path)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    calls = []
    module.net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    out = module.sample(16, y=torch.zeros(16, dtype=torch.long), guidance_scale=3.0)
    assert out.nfe == 10 and len(calls) == 10 and set(calls) == {32}  # doubled batch, one forward each
    calls.clear()
    em = build_sampler_from({"name": "euler_maruyama", "steps": 7}, module.path)
    assert module.sample(16, sampler=em, y=torch.zeros(16, dtype=torch.long)).nfe == 7 and len(calls) == 7


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["guidance=cfg", "data=toy", "data.name=gaussian"], "guidance=cfg needs labelled data"),
        (["data=moons_to_8gaussians", "objective=score"], "use objective=cfm"),
        (["path.sigma=0.1", "objective=noise"], "use objective=cfm"),
        (["data=moons_to_8gaussians", "sampler=euler_maruyama"], "use an ODE sampler"),
        (["sampler.steps=0"], "at least one step"),
    ],
)
def test_invalid_combinations_fail_at_start_up(overrides, message, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        build_module(cfg, build_datamodule(cfg))
    assert str(err.value).count(". ") == 0  # one sentence


def test_data_to_data_flow_trains(tmp_path):
    cfg = compose_cfg(["data=moons_to_8gaussians", "path.sigma=0.1", "coupling=ot", *FAST], tmp_path)
    metrics = train(cfg)
    assert set(metrics) >= {"val/w2", "val/w2_floor", "val/loss", "train/loss"}
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert list((tmp_path / "plots").glob("samples_step*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_short_training_of_each_objective_reaches_w2_bound(objective, tmp_path):
    """gmm (5 modes, std 0.5, radius 4), CondOT, 2,500 steps with EMA (decay 0.99), W2 on 1,000 points.

    Bound 1.1: measured 0.5-1.0 across the four objectives (the finite-sample floor is ~0.18, the
    untrained model ~3); a broken conversion, target or time range lands far above.
    """
    cfg = compose_cfg(
        [
            f"objective={objective}",
            "data=gmm",
            "data.params.scale=4.0",
            "data.params.std=0.5",
            "trainer.max_steps=2500",
            "data.steps_per_epoch=2500",
            "net.depth=4",
            "net.activation=silu",
            "data.n_val=1000",
            "data.n_test=1000",
            "callbacks.metrics.n=1000",
            "callbacks.plot=null",
            "callbacks.progress_bar=null",
            "trainer.enable_progress_bar=false",
            "logger=[]",
            "callbacks.ema.decay=0.99",
        ],
        tmp_path,
    )
    metrics = train(cfg)
    print(f"{objective}: W2 {metrics['val/w2']:.3f}, floor {metrics['val/w2_floor']:.3f}")
    assert metrics["val/w2"] < 1.1, metrics
    assert metrics["val/w2_floor"] < 0.3


def test_checkpoint_carries_config_and_ema_weights(tmp_path):
    cfg = compose_cfg(
        ["trainer.max_steps=30", "data.steps_per_epoch=30", "callbacks.ema.decay=0.9", *FAST[2:]], tmp_path
    )
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["flowdiff_config"]["objective"]["name"] == "cfm"
    # Lightning's EMA stores the average as the state_dict and the live weights apart
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 30


def test_optimizer_and_scheduler_are_partials(tmp_path):
    cfg = compose_cfg(
        ["+scheduler._target_=torch.optim.lr_scheduler.StepLR", "+scheduler._partial_=true", "+scheduler.step_size=2"],
        tmp_path,
    )
    module = build_module(cfg, build_datamodule(cfg))
    conf = module.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.AdamW)
    assert conf["lr_scheduler"]["interval"] == "step"
    assert instantiate(cfg.optimizer).keywords["lr"] == 1e-3
