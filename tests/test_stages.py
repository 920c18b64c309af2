"""Few-step stages: distillation and consistency models (reflow: test_reflow.py), their samplers and refusals."""

import pytest
import torch

from flowdiff.build import build_run, load_checkpoint
from flowdiff.errors import ConfigError
from flowdiff.model import FlowModel
from flowdiff.nets import MLP
from flowdiff.paths import CondOTSchedule, CosineSchedule, GaussianPath
from flowdiff.runs import train
from flowdiff.samplers import ConsistencySampler
from flowdiff.stages.consistency import (
    ConsistencyModule,
    ImprovedCurriculum,
    SongCurriculum,
    consistency_problem,
    training_points,
)
from flowdiff.stages.trajectories import make_trajectories
from helpers import FAST, compose_cfg, objective_of, sampler_from_conf
from test_samplers import GaussianOracle

BASE = [*FAST, "data=moons", "callbacks.plot=null"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train(compose_cfg(BASE, out))
    return out / "checkpoints" / "last.ckpt"


def _module(schedule, objective="cfm", dtype=torch.float32):
    torch.manual_seed(0)
    net = MLP(data_shape=[3], width=16, depth=2).to(dtype)
    return ConsistencyModule(FlowModel(net, GaussianPath(schedule), objective_of(objective), data_shape=(3,)))


# ---------------------------------------------------------------- the consistency function
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("schedule_name", ["condot", "cosine"])
def test_consistency_function_meets_its_boundary_condition_exactly(schedule_name, dtype):
    """f(x, 1) = x bit for bit (c_skip(1) = 1, c_out(1) = 0 from alpha_1 = 1, beta_1 = 0), for a random network
    whose output is far from zero; below t = 1 the network does move x."""
    from conftest import ALL_SCHEDULES

    module = _module(ALL_SCHEDULES[schedule_name], dtype=dtype)
    x = 3 * torch.randn(64, 3, dtype=dtype)
    ones = torch.ones(64, dtype=dtype)
    assert torch.equal(module.consistency_function(module.net, x, ones), x)
    assert torch.equal(module.consistency_function(module.target_net, x, ones), x)
    inside = module.consistency_function(module.net, x, torch.full((64,), 0.5, dtype=dtype))
    assert (inside - x).abs().max() > 1e-2
    # the sampler's f is the same function: the module's data prediction
    fields = module.vector_fields()
    assert torch.equal(fields.data(x, ones), x)


@pytest.mark.parametrize(
    "schedule_name, objective, why",
    [
        ("condot", "data", "boundary condition would not hold"),
        ("condot", "noise", "not finite on all of \\[0, 1\\]"),
        ("condot", "score", "not finite on all of \\[0, 1\\]"),
        ("linear_vp", "cfm", "not finite on all of \\[0, 1\\]"),
        ("sqrt", "cfm", "not finite on all of \\[0, 1\\]"),
        ("polynomial", "cfm", "not finite on all of \\[0, 1\\]"),  # alpha = t^2: velocity says nothing of z at 0
    ],
)
def test_parameterisations_without_the_boundary_condition_are_refused(schedule_name, objective, why):
    from conftest import ALL_SCHEDULES

    path, obj = GaussianPath(ALL_SCHEDULES[schedule_name]), objective_of(objective)
    assert consistency_problem(path, obj) is not None
    with pytest.raises(ValueError, match=why):
        _module(ALL_SCHEDULES[schedule_name], objective)


def test_consistency_training_schedule_follows_song_et_al():
    """N(k) from s0 points at step 0 to s1 + 1 at the end, never decreasing; mu(N) = exp(s0 log mu0 / N)."""
    points = [training_points(k, 1000, 2, 150) for k in range(0, 1001, 50)]
    assert points[0] == 2 and points[-1] == 151 and points == sorted(points)
    module = _module(CondOTSchedule())
    module.curriculum = SongCurriculum()  # with improved CT's target: the online network (mu0 = 0)
    assert module.teacher is None and module.schedule(step=0) == (1, 0.0)
    module.curriculum = SongCurriculum(mu0=0.9)  # Song et al.'s: mu(N) = exp(s0 log mu0 / N), mu0 at N = s0 = 2
    intervals, mu = module.schedule(step=0)
    assert intervals == 1 and mu == pytest.approx(0.9)


def test_improved_curriculum_is_song_and_dhariwals_on_the_path():
    """iCT (Song & Dhariwal 2023): N doubles from 10 to 1280 intervals in log2(128) + 1 = 8 stages of K / 8 steps;
    the grid is Karras et al.'s in sigma = beta / alpha (rho 7, 0.002 to 80) at the times where the path has those
    sigmas; intervals are drawn with the lognormal's mass between their ends, and weighted 1 / (sigma_i -
    sigma_{i+1})."""
    import math

    ict = ImprovedCurriculum()
    assert [ict.points(k, 8000) for k in (0, 999, 1000, 2000, 6999, 7000, 8000)] == [11, 11, 21, 41, 641, 1281, 1281]
    path = GaussianPath(CosineSchedule())
    times = ict.times(11, path, 0.0, 1.0)
    assert (times.diff() > 0).all()
    ramp = torch.linspace(1, 0, 11, dtype=torch.float64)
    karras = (0.002 ** (1 / 7) + ramp * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(path.noise_to_signal(times), karras, rtol=1e-9, atol=0)
    torch.testing.assert_close(ict.weights(path, times), 1 / (karras[:-1] - karras[1:]))
    drawn = ict.draw(times, 200_000, torch.Generator().manual_seed(0))
    cdf = torch.tensor([0.5 * (1 + math.erf((math.log(s) + 1.1) / (2 * math.sqrt(2)))) for s in karras.tolist()])
    expected = (cdf[:-1] - cdf[1:]).float()
    seen = torch.bincount(drawn, minlength=10) / len(drawn)
    torch.testing.assert_close(seen, expected / expected.sum(), atol=4e-3, rtol=0)


# ---------------------------------------------------------------- samplers
def test_consistency_sampler_with_the_exact_flow_map_is_exact_at_any_step_count():
    """Data N(mu, s^2 I): with f the exact ODE flow map to t = 1, one step and three steps (re-noised onto p_t in
    between) both give samples of N(mu, s^2), and report NFE = steps."""
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    oracle = GaussianOracle(CondOTSchedule(), mu, s)

    def f(x, t):  # the flow map from (x, t) to t = 1; all t are equal within a call
        return oracle.flow(x, float(t[0]), 1.0)

    path = GaussianPath(CondOTSchedule())
    x0 = torch.randn(200_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps in (1, 3):
        out = ConsistencySampler(path, steps=steps).sample(None, x0, data_fn=f, generator=torch.Generator())
        assert out.nfe == steps
        assert torch.allclose(out.x.mean(0), mu, atol=0.01), steps
        assert torch.allclose(out.x.std(0), torch.full((2,), s, dtype=torch.float64), atol=0.01), steps


def test_one_step_samplers_report_nfe_one():
    torch.manual_seed(0)
    path = GaussianPath(CondOTSchedule())
    module = FlowModel(MLP(data_shape=[2], width=16, depth=2), path, objective_of("cfm"), data_shape=(2,))
    for name in ("euler", "consistency", "ddim"):
        sampler = sampler_from_conf(name, path=path, steps=1)
        assert module.sample(50, sampler=sampler).nfe == 1, name
    assert module.sample(50, sampler=sampler_from_conf("consistency", path=path, steps=4)).nfe == 4
    assert module.sample(50, sampler=sampler_from_conf("heun", steps=1)).nfe == 2


# ---------------------------------------------------------------- distillation
def test_teacher_trajectories_are_its_own_ode_states(teacher):
    """k = 2 trajectories with the teacher's 10-step Euler: states 0, 5 and 10 of its own trajectory, exactly."""
    module, _, _ = load_checkpoint(teacher)
    sampler = sampler_from_conf("euler", steps=10)
    out = make_trajectories(module, 40, sampler, steps=2, batch_size=16, seed=3)
    assert out["xs"].shape == (40, 3, 2) and torch.allclose(out["times"], torch.tensor([0.0, 0.5, 1.0]))
    again = module.sample(40, sampler=sampler, x0=out["xs"][:, 0], return_trajectory=True)
    assert torch.equal(out["xs"][:, 1], again.trajectory[5]) and torch.equal(out["xs"][:, 2], again.x)
    with pytest.raises(ValueError, match="takes 10 steps, not a multiple of the student's 3"):
        make_trajectories(module, 4, sampler, steps=3)


def test_distilled_student_trains_on_the_teachers_trajectories_and_samples_alone(teacher, tmp_path):
    """stage=distill stage.steps=2: batches carry the teacher's 3 states, the student starts from its weights, its
    sampler is 2-step Euler (NFE 2 at validation) and its checkpoint samples without the teacher; a progressive
    round on it (its own 2 Euler steps halved to 1) trains too."""
    common = [*BASE, f"log_root={tmp_path}", "stage.n_pairs=64", "sampler@stage.sampler=euler"]
    common.append("stage.sampler.steps=8")
    cfg = compose_cfg([*common, "stage=distill", f"teacher={teacher}", "stage.steps=2"], tmp_path / "two")
    student, dm = build_run(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["xs"].shape[1:] == (3, 2) and torch.allclose(batch["times"][0], torch.tensor([0.0, 0.5, 1.0]))
    assert type(student).__name__ == "DistillationModule"
    t, _, _ = load_checkpoint(teacher)
    assert torch.equal(student.net.state_dict()["body.0.weight"], t.net.state_dict()["body.0.weight"])
    loss = student.loss(batch)
    assert torch.isfinite(loss) and loss > 0
    metrics = train(cfg)
    assert metrics["nfe"] == 2 and metrics["val/w2"] < 5
    # the run ends with W2 at each NFE of the default profile (with the student's own Euler steps) and straightness
    assert metrics["val/w2_nfe2"] == pytest.approx(metrics["val/w2"], abs=0.5)
    assert all(metrics[f"val/w2_nfe{k}"] > 0 for k in (1, 4, 8, 100)) and metrics["val/straightness"] > 0
    ckpt = tmp_path / "two" / "checkpoints" / "last.ckpt"
    alone, _, _ = load_checkpoint(ckpt)
    assert alone.sample(10).nfe == 2
    from flowdiff.evaluation import sample  # sample.py sweeps its step count like any model's

    out = sample(compose_cfg([f"ckpt={ckpt}", "sampler.steps=4", "n=64"], tmp_path / "s", config="sample"))
    assert out["nfe"] == 4 and out["w2"] > 0 and out["straightness"] > 0
    halved = [*common, "stage=distill", f"teacher={ckpt}", "stage.steps=1", "stage.progressive=true"]
    assert train(compose_cfg(halved, tmp_path / "one"))["nfe"] == 1


# ---------------------------------------------------------------- consistency models
@pytest.mark.parametrize("with_teacher", [True, False], ids=["distillation", "training"])
def test_consistency_model_trains_updates_its_target_and_samples_in_one_step(teacher, tmp_path, with_teacher):
    extra = [f"teacher={teacher}"] if with_teacher else ["stage.init_from_teacher=false"]
    cfg = compose_cfg([*BASE, "stage=consistency", "callbacks.ema=null", *extra], tmp_path / "cm")
    module, _ = build_run(cfg)
    assert (module.teacher is not None) == with_teacher
    before = {k: v.clone() for k, v in module.target_net.state_dict().items()}
    if with_teacher:  # distillation starts from the teacher, target included
        t, _, _ = load_checkpoint(teacher)
        assert torch.equal(before["body.0.weight"], t.net.state_dict()["body.0.weight"])
    metrics = train(cfg)
    assert metrics["nfe"] == 1 and metrics["val/w2"] < 5
    ckpt = tmp_path / "cm" / "checkpoints" / "last.ckpt"
    trained, _, _ = load_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]  # the target network is training's, not the model's
    after, online = state["target_net.body.0.weight"], trained.net.state_dict()["body.0.weight"]
    assert not torch.equal(after, before["body.0.weight"])  # the target moved
    # distillation: an EMA of the online net (mu = 0.95), not the net itself; training: the online net (mu = 0)
    assert torch.equal(after, online) != with_teacher
    two = trained.sample(20, sampler=sampler_from_conf("consistency", path=trained.path, steps=2))
    assert two.nfe == 2 and torch.isfinite(two.x).all()


def test_a_consistency_student_samples_at_w_1_unless_told(tmp_path):
    """A stage's student (consistency training too, without a teacher) takes guidance scale 1; the command line
    may set another."""
    base = [*FAST, "data=moons", "guidance=cfg", "stage=consistency", "callbacks.plot=null"]
    with_scale = compose_cfg(base, tmp_path / "a")
    with_scale.guidance.scale = 3.0  # as an experiment file would set it
    assert build_run(with_scale)[0].guidance.scale == 1.0
    told = compose_cfg([*base, "guidance.scale=2"], tmp_path / "b")
    assert build_run(told)[0].guidance.scale == 2.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["stage=distill"], r"stage=distill needs teacher=<a checkpoint written by train.py>"),
        (["stage=train", "teacher=TEACHER"], r"teacher=.* is set but stage=train does not use one"),
        (["stage=distill", "teacher=TEACHER", "objective=score"], r"stage=distill trains Euler steps .* objective=cfm"),
        (["stage=distill", "teacher=TEACHER", "sampler.steps=3"], r"trains a 1-step student but sampler.steps=3: drop"),
        (["stage=distill", "teacher=TEACHER", "stage.progressive=true"], r"its sampler is EulerSampler\(steps=100,"),
        (
            [
                "stage=distill",
                "teacher=TEACHER",
                "stage.steps=3",
                "sampler@stage.sampler=heun",
                "stage.sampler.steps=8",
            ],
            r"stage=distill: the teacher's sampler takes 8 steps, not a multiple of the student's 3",
        ),
        (["stage=consistency", "objective=data"], r"cannot use objective=data with the CondOTSchedule: .* boundary"),
        (
            ["stage=consistency", "path=sqrt"],
            r"objective=cfm with the SqrtSchedule: .*; use path=condot or path=cosine",
        ),
        (["stage=consistency", "teacher=TEACHER", "guidance=cfg"], r"the teacher was trained with guidance=none"),
        (["stage=consistency", "teacher=TEACHER", "stage.curriculum.s0=1"], r"consistency settings out of range"),
        (["stage=consistency", "data=8gaussians", "teacher=TEACHER"], r"teacher was trained on data=moons"),
    ],
)
def test_stages_refuse_what_cannot_work_in_one_sentence(teacher, tmp_path, extra, message):
    extra = [e.replace("TEACHER", str(teacher)) for e in extra]
    cfg = compose_cfg([*BASE, f"log_root={tmp_path}", *extra], tmp_path / "r")
    with pytest.raises(ConfigError, match=message):
        _, dm = build_run(cfg)
        dm.setup("fit")


@pytest.mark.slow
def test_one_step_students_meet_their_targets_against_the_teacher(tmp_path):
    """N(0, I) -> moons, 2,000 steps each (about 2 minutes on 2 cores): one step of the distilled student within
    1.3x, and of the consistency-distilled model within 2x, of the teacher's 100-step W2 (1.05x and 1.14x when
    measured with the L2 loss; bench/few_step.py runs 5,000 steps)."""
    long = ["data=moons", "trainer.max_steps=2000", "data.steps_per_epoch=2000", "callbacks.plot=null"]
    long += ["callbacks.progress_bar=null", "trainer.enable_progress_bar=false", f"log_root={tmp_path}"]
    teacher = train(compose_cfg(long, tmp_path / "teacher"))
    ckpt = tmp_path / "teacher" / "checkpoints" / "last.ckpt"
    distilled = train(compose_cfg([*long, "stage=distill", f"teacher={ckpt}"], tmp_path / "distilled"))
    consistency = train(compose_cfg([*long, "stage=consistency", f"teacher={ckpt}"], tmp_path / "cd"))
    reference = teacher["val/w2_nfe100"]
    assert distilled["val/w2_nfe1"] < 1.3 * reference, (distilled["val/w2_nfe1"], reference)
    assert consistency["val/w2_nfe1"] < 2.0 * reference, (consistency["val/w2_nfe1"], reference)
    assert teacher["val/w2_nfe1"] > 2 * reference  # one step of the teacher itself is far off


def test_checkpoints_from_before_curricula_train_with_song_et_al():
    """A consistency run's stored config from before curricula were a choice (s0, s1, mu0 beside the other settings)
    rebuilds with Song et al.'s curriculum and those values; today's configs name theirs."""
    from hydra.utils import instantiate

    from flowdiff.compat import upgrade
    from flowdiff.stages import ConsistencyStage

    old = {
        "objective": {"name": "cfm"},
        "path": {"schedule": {"_target_": "flowdiff.paths.CondOTSchedule"}, "sigma": 0.0},
        "guidance": {"name": "none"},
        "sampler": {"name": "consistency", "steps": 1},
        "coupling": {"name": "independent"},
        "stage": {"name": "consistency"},
        "consistency": {"intervals": 18, "s0": 3, "s1": 40, "mu0": 0.5, "loss": "l2"},
    }
    built = instantiate(upgrade(old)["stage"]["curriculum"])
    assert isinstance(built, SongCurriculum) and (built.s0, built.s1, built.mu0) == (3, 40, 0.5)
    new = {
        "_target_": "flowdiff.stages.ConsistencyStage",
        "curriculum": {"_target_": f"{ImprovedCurriculum.__module__}.ImprovedCurriculum", "s0": 4},
    }
    stage = instantiate(new)
    assert isinstance(stage, ConsistencyStage) and stage.module_kwargs()["curriculum"].s0 == 4


def test_consistency_training_loss_weights_each_interval_and_puts_the_online_net_at_its_noisy_end():
    """With iCT's curriculum, the loss of a batch whose intervals are i is the mean of w_i d(f(x_{t_i}, t_i),
    f^-(x_{t_{i+1}}, t_{i+1})): the online network at the interval's noisier end (smaller t, larger sigma), the target
    at its cleaner end, with the same data and noise, and w_i = 1 / (sigma_i - sigma_{i+1})."""
    from flowdiff.stages.distances import distance

    module = _module(CondOTSchedule())
    module.curriculum = ImprovedCurriculum()
    module.target_net.load_state_dict({k: v + 0.01 for k, v in module.net.state_dict().items()})  # f^- != f
    z = torch.randn(6, 3)
    i = torch.tensor([0, 3, 5, 9, 9, 2])
    module.draw_intervals = lambda times, n, generator=None: i
    loss = module.loss({"x1": z}, generator=torch.Generator().manual_seed(0))
    times, weights = module.grid(module.schedule()[0])
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    s, t = times[i].float(), times[i + 1].float()
    assert (s < t).all()
    online = module.consistency_function(module.net, module.path.sample(z, eps, s).x_t, s)
    target = module.consistency_function(module.target_net, module.path.sample(z, eps, t).x_t, t)
    expected = (weights[i].float() * distance(online, target, "pseudo_huber")).mean()
    torch.testing.assert_close(loss, expected)
    swapped = (
        weights[i].float()
        * distance(
            module.consistency_function(module.net, module.path.sample(z, eps, t).x_t, t),
            module.consistency_function(module.target_net, module.path.sample(z, eps, s).x_t, s),
            "pseudo_huber",
        )
    ).mean()
    assert not torch.allclose(loss, swapped)
