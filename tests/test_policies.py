"""Policies: context conditioning (with CFG's learned null context), action-chunk networks, behaviour cloning as one
data step, the obstacle toy's expert and rollouts, and a flow policy against regression on it."""

import json

import pytest
import torch

from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.model import FlowModel
from flowdiff.nets import PolicyMLP, PolicyUNet1D
from flowdiff.objectives import Objective
from flowdiff.paths import CondOTSchedule, GaussianPath
from flowdiff.policies.data import ObstacleDataModule
from flowdiff.policies.obstacle import ObstacleReach, expert_demonstrations
from flowdiff.samplers import ConsistencySampler
from helpers import POLICY_FAST, compose_cfg


@pytest.mark.parametrize("net_cls", [PolicyMLP, PolicyUNet1D])
def test_policy_nets_condition_on_the_context_and_learn_a_null_one(net_cls):
    torch.manual_seed(0)
    net = net_cls(data_shape=(8, 3), context_dim=5)
    x, t, c = torch.randn(4, 8, 3), torch.rand(4), torch.randn(4, 5)
    out = net(x, t, c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, net(x, t, c + 1))  # the context matters
    nan_rows = c.clone()
    nan_rows[[1, 3]] = float("nan")
    mixed, null = net(x, t, nan_rows), net(x, t, None)  # NaN rows are the learned null context
    assert torch.allclose(mixed[[1, 3]], null[[1, 3]], atol=1e-6) and torch.allclose(
        mixed[[0, 2]], out[[0, 2]], atol=1e-6
    )
    assert any(n == "cond.null_context" for n, _ in net.named_parameters())
    with pytest.raises(ValueError, match="horizon"):
        net_cls(data_shape=(2,), context_dim=5)
    partly = c.clone()
    partly[0, 0] = float("nan")
    with pytest.raises(ValueError, match="partly NaN"):
        net(x, t, partly)


def test_context_dropout_and_guidance_with_a_null_context():
    """CFG on a context: training drops whole rows to NaN with probability p_uncond; sampling with w mixes the
    conditional and the null-context predictions as for labels (one doubled forward)."""
    cfg = ClassifierFreeGuidance(null_label=0, p_uncond=0.3)
    c = torch.randn(20_000, 4)
    dropped = cfg.drop_labels(c, torch.Generator().manual_seed(0))
    rows = torch.isnan(dropped).all(1)
    assert torch.isnan(dropped).any(1).eq(rows).all()  # whole rows
    assert 0.28 < rows.float().mean() < 0.32 and torch.equal(dropped[~rows], c[~rows])
    torch.manual_seed(0)
    net = PolicyMLP(data_shape=(4, 2), context_dim=4, width=32, depth=1)
    model = FlowModel(net, GaussianPath(CondOTSchedule()), Objective("velocity"), (4, 2), guidance=cfg)
    x, t, cc = torch.randn(6, 4, 2), torch.rand(6), torch.randn(6, 4)
    cond, null = net(x, t, cc), net(x, t, None)
    guided = model.prediction(x, t, cc, guidance_scale=3.0)
    assert torch.allclose(guided, null + 3.0 * (cond - null), atol=1e-5)
    assert torch.allclose(model.prediction(x, t, cc, guidance_scale=1.0), cond)
    # without CFG a context is still seen, in training and sampling
    plain = FlowModel(net, GaussianPath(CondOTSchedule()), Objective("velocity"), (4, 2))
    assert torch.equal(plain.training_labels(cc), cc) and torch.allclose(plain.prediction(x, t, cc), cond)


class _LinearInContext(torch.nn.Module):
    """A network that sees only the context: ``W c + b``, shaped as the chunk."""

    null_label = 0

    def __init__(self, context_dim: int, shape: tuple[int, int]) -> None:
        super().__init__()
        self.shape = shape
        self.lin = torch.nn.Linear(context_dim, shape[0] * shape[1])

    def forward(self, x, t, y=None):
        return self.lin(y).view(-1, *self.shape)


def test_regression_is_one_data_step_and_equals_least_squares():
    """Behaviour cloning by regression in flowdiff: a data-objective model's one evaluation at t = 0 from noise.
    With a network linear in the context, the least-squares fit of actions on observations minimises flowdiff's
    data loss (its gradient vanishes there, whatever the noise and times drawn) and the one-step sample is that
    fit's prediction E[a | o]."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(300, 3, generator=g, dtype=torch.float64)
    z = (
        c @ torch.randn(3, 8, generator=g, dtype=torch.float64)
        + 0.5 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    ).view(300, 4, 2)
    design = torch.cat([c, torch.ones(300, 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, z.flatten(1)).solution  # (4, 8)
    net = _LinearInContext(3, (4, 2)).double()
    with torch.no_grad():
        net.lin.weight.copy_(coef[:3].T)
        net.lin.bias.copy_(coef[3])
    model = FlowModel(net, GaussianPath(CondOTSchedule()), Objective("data"), (4, 2))
    loss = model.loss({"x1": z, "c": c}, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(loss, list(net.parameters()))
    assert max(float(gr.abs().max()) for gr in grads) < 1e-10
    x0 = torch.randn(300, 4, 2, generator=g, dtype=torch.float64)
    one = model.sample(300, ConsistencySampler(model.path, steps=1), y=c, x0=x0)
    assert one.nfe == 1 and torch.allclose(one.x.flatten(1), design @ coef, atol=1e-10)


def test_obstacle_expert_succeeds_and_demonstrations_are_bimodal():
    episodes = expert_demonstrations(40, seed=3)
    assert all(ep["success"] for ep in episodes)
    first_x = torch.stack([ep["actions"][0:5].sum(0)[0] for ep in episodes])  # where the first steps head
    assert (first_x < -0.1).sum() >= 10 and (first_x > 0.1).sum() >= 10  # both ways round, about half each
    dm = ObstacleDataModule(demos=20, seed=1)
    assert dm.expert_success_rate == 1.0 and dm.data_shape == (8, 2) and dm.context_dim == 2
    from flowdiff.seeds import stream_seed

    demo_seed = stream_seed("demonstrations", 1) % 2**31
    assert demo_seed not in {dm.evaluation_seed(k) for k in range(10)}  # evaluation starts are not demonstrations'
    evaluation = ObstacleReach(20, dm.evaluation_seed()).reset()
    demo_starts = torch.stack([ep["obs"][0] for ep in dm.episodes])
    assert torch.cdist(evaluation, demo_starts).min() > 1e-4
    # the normalisation round trip: what the net generates comes back in the environment's units
    chunk = torch.stack([ep["actions"][:8] for ep in dm.episodes[:3]])
    assert torch.allclose(dm.normaliser.actions_out(dm.normaliser.actions_in(chunk)), chunk, atol=1e-6)


def test_a_policy_trains_and_rolls_out_with_its_success_logged(tmp_path):
    from flowdiff.runs import train

    cfg = compose_cfg(
        ["experiment=obstacle_flow", *POLICY_FAST, "data.demos=4"],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert 0 <= metrics["val/success_rate"] <= 1 and metrics["nfe"] == 2 and metrics["val/ms_per_chunk"] > 0
    assert metrics["val/steps_to_success"] != metrics["val/steps_to_success"] or metrics["val/steps_to_success"] > 0
    assert (tmp_path / "run" / "plots" / "rollouts_step0000004.png").exists()
    assert (
        json.loads((tmp_path / "run" / "metrics.json").read_text())["val/success_rate"] == metrics["val/success_rate"]
    )
    from flowdiff.evaluation import sample  # sample.py on a policy checkpoint rolls it out, with any sampler

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = sample(compose_cfg([f"ckpt={ckpt}", "rollout.n_episodes=3", "sampler.steps=3"], tmp_path / "s", "sample"))
    assert out["nfe"] == 3 and out["episodes"] == 3 and 0 <= out["success_rate"] <= 1 and out["ms_per_chunk"] > 0
    assert out["expert_success_rate"] == 1.0 and (tmp_path / "s" / "rollouts.png").exists()


@pytest.mark.slow
def test_flow_policy_picks_a_way_round_where_regression_averages_into_the_disc(tmp_path):
    """The lecture-5 argument on the obstacle toy (about 2 CPU minutes): the expert succeeds in every episode, the
    flow policy (pi-0's 10 Euler steps) in at least 90% of 50 evaluation episodes and regression (one data step:
    E[a | o], whose first chunk is the mean of the two ways round, executed 8 steps open loop) in at most 60%."""
    from flowdiff.runs import train

    quiet = ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", "trainer.max_steps=2000"]
    flow = train(compose_cfg(["experiment=obstacle_flow", *quiet], tmp_path / "flow"))
    regression = train(compose_cfg(["experiment=obstacle_regression", *quiet], tmp_path / "regression"))
    assert ObstacleDataModule(demos=100).expert_success_rate == 1.0
    assert flow["val/success_rate"] >= 0.9, flow
    assert regression["val/success_rate"] <= 0.6, (regression, flow)


def test_the_best_checkpoint_is_the_most_successful_whoever_names_the_metric(tmp_path):
    """monitor=auto selects by val/success_rate, the larger the better; naming a metric with the mode that would
    keep the worst is one sentence, and the right mode is taken as given."""
    from flowdiff.build import build_callbacks, build_datamodule
    from flowdiff.errors import ConfigError

    small = ["experiment=obstacle_flow", "data.demos=2"]

    def checkpoint(*extra):
        cfg = compose_cfg([*small, *extra], tmp_path / "run")
        return next(c for c in build_callbacks(cfg, build_datamodule(cfg)) if type(c).__name__ == "ModelCheckpoint")

    auto = checkpoint()
    assert (auto.monitor, auto.mode, float(auto.kth_value)) == ("val/success_rate", "max", float("-inf"))
    with pytest.raises(ConfigError, match=r"mode=min would keep the worst val/success_rate .*checkpoint.mode=max"):
        checkpoint("callbacks.checkpoint.monitor=val/success_rate")
    with pytest.raises(ConfigError, match=r"mode=max would keep the worst val/steps_to_success .*checkpoint.mode=min"):
        checkpoint("callbacks.checkpoint.monitor=val/steps_to_success", "callbacks.checkpoint.mode=max")
    named = checkpoint("callbacks.checkpoint.monitor=val/success_rate", "callbacks.checkpoint.mode=max")
    assert (named.monitor, named.mode) == ("val/success_rate", "max")


def test_choices_that_would_drop_the_context_are_one_sentence(tmp_path):
    """A net without a context, a stage that does not pass it on, a batch with a context and labels: refused."""
    from flowdiff.build import build_run
    from flowdiff.errors import ConfigError

    small = ["experiment=obstacle_flow", "data.demos=2"]
    with pytest.raises(ConfigError, match="net=MLP takes no context"):
        build_run(compose_cfg([*small, "net=mlp"], tmp_path / "a"))
    model, dm = build_run(compose_cfg(small, tmp_path / "c"))
    with pytest.raises(ValueError, match="both a context c and labels y"):
        model.loss({**dm.draw(4), "y": torch.zeros(4, dtype=torch.long)})


def test_a_one_step_student_of_a_policy_teacher_is_conditioned_on_the_teachers_contexts(tmp_path):
    """stage=distill stage.steps=1 on a policy teacher: its trajectories pair each noise and one of the data's
    contexts with the teacher's chunk for that context (c, not labels), the student's loss passes the context, and
    it rolls out with one network evaluation per chunk."""
    from flowdiff.build import build_run, load_checkpoint
    from flowdiff.runs import train

    # the student's sampler follows stage.steps, so only the teacher's is set
    small = ["experiment=obstacle_flow", "data.demos=4", f"log_root={tmp_path}"]
    small += [o for o in POLICY_FAST if not o.startswith("sampler.")]
    train(compose_cfg([*small, "sampler.steps=2"], tmp_path / "teacher"))
    ckpt = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    student_cfg = [*small, "stage=distill", f"teacher={ckpt}", "stage.steps=1", "stage.n_pairs=32"]
    student_cfg += ["sampler@stage.sampler=euler", "stage.sampler.steps=2"]
    student, dm = build_run(compose_cfg(student_cfg, tmp_path / "student"))
    dm.setup("fit")
    pairs = dm.pairs
    assert "y" not in pairs and pairs["c"].shape == (32, dm.context_dim)
    assert all(any(torch.equal(row, c) for c in dm.contexts) for row in pairs["c"][:4])  # the data's observations
    teacher, teacher_dm, _ = load_checkpoint(ckpt)
    from flowdiff.samplers import EulerSampler

    again = teacher.sample(4, EulerSampler(steps=2), y=pairs["c"][:4], x0=pairs["xs"][:4, 0]).x
    assert torch.allclose(again, pairs["xs"][:4, -1], atol=1e-5)  # the teacher's chunk for that noise and context
    batch = dm.draw(8, torch.Generator().manual_seed(0))
    assert "c" in batch and torch.isfinite(student.loss(batch))
    seen = []
    forward = student.model._forward
    student.model._forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    student.loss(batch)
    assert torch.equal(seen[0], batch["c"])
    metrics = train(compose_cfg(student_cfg, tmp_path / "student"))
    assert metrics["nfe"] == 1 and 0 <= metrics["val/success_rate"] <= 1
    # the student's checkpoint keeps the normalisation (inside its pairs' state), so it rolls out in its units
    saved = torch.load(tmp_path / "student" / "checkpoints" / "last.ckpt", weights_only=False)
    assert torch.equal(saved["PairsDataModule"]["base"]["normaliser"]["act_std"], dm.normaliser.act_std)
    _, alone, _ = load_checkpoint(tmp_path / "student" / "checkpoints" / "last.ckpt")
    assert torch.equal(alone.normaliser.obs_mean, teacher_dm.normaliser.obs_mean)
    # stage=consistency distills the same teacher: its student, its target network and the teacher's steps all see
    # the batch's context, and it samples a chunk in one evaluation
    consistency_cfg = [*small, "stage=consistency", f"teacher={ckpt}", "sampler=consistency", "sampler.steps=1"]
    consistent, cdm = build_run(compose_cfg(consistency_cfg, tmp_path / "consistency"))
    assert torch.equal(cdm.normaliser.obs_std, teacher_dm.normaliser.obs_std)  # the teacher's units
    batch = cdm.draw(8, torch.Generator().manual_seed(0))
    seen, teacher_seen = [], []
    forward, teacher_forward = consistent.model._forward, consistent.teacher._forward
    consistent.model._forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    consistent.teacher._forward = lambda x, t, y: teacher_seen.append(y) or teacher_forward(x, t, y)
    assert torch.isfinite(consistent.loss(batch))
    assert torch.equal(seen[0], batch["c"]) and torch.equal(teacher_seen[0], batch["c"])
    metrics = train(compose_cfg(consistency_cfg, tmp_path / "consistency"))
    assert metrics["nfe"] == 1 and 0 <= metrics["val/success_rate"] <= 1
