"""Gaussian path: ends, velocity = d/dt x_t, the twelve conversions, the course's formula, safe ranges."""

import itertools

import pytest
import torch

from conftest import ALL_SCHEDULES
from flowdiff.paths import PARAMETERISATIONS, CondOTSchedule, GaussianPath, NoisyInterpolantPath
from helpers import objective_of


def _batch(n=64, d=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_ends(name):
    if name == "linear_vp":
        pytest.skip("VP never reaches alpha_0 = 0 (tested in test_schedules)")
    path = GaussianPath(ALL_SCHEDULES[name])
    z, eps = _batch()
    n = z.shape[0]
    assert torch.allclose(path.sample(z, eps, torch.zeros(n, dtype=torch.float64)).x_t, eps)
    assert torch.allclose(path.sample(z, eps, torch.ones(n, dtype=torch.float64)).x_t, z)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_velocity_is_time_derivative(name):
    path = GaussianPath(ALL_SCHEDULES[name])
    z, eps = _batch()
    t = torch.rand(z.shape[0], dtype=torch.float64) * 0.98 + 0.01
    jvp = torch.func.jvp(lambda tt: path.sample(z, eps, tt).x_t, (t,), (torch.ones_like(t),))[1]
    torch.testing.assert_close(path.sample(z, eps, t).velocity, jvp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
@pytest.mark.parametrize("src,dst", list(itertools.permutations(PARAMETERISATIONS, 2)))
def test_conversions_round_trip_and_hit_targets(name, src, dst):
    path = GaussianPath(ALL_SCHEDULES[name])
    z, eps = _batch()
    t = torch.linspace(0.01, 0.99, z.shape[0], dtype=torch.float64)
    ps = path.sample(z, eps, t)
    # conditional targets convert exactly into each other ...
    out = path.convert(ps.target(src), src, dst, ps.x_t, t)
    torch.testing.assert_close(out, ps.target(dst), rtol=1e-10, atol=1e-10)
    # ... and an arbitrary prediction round-trips
    pred = torch.randn_like(z)
    back = path.convert(path.convert(pred, src, dst, ps.x_t, t), dst, src, ps.x_t, t)
    torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_course_score_to_velocity_formula(name):
    """u = (beta^2 d_alpha / alpha - d_beta beta) s + (d_alpha / alpha) x  (course notes, written out here)."""
    path = GaussianPath(ALL_SCHEDULES[name])
    x, score = _batch()
    t = torch.linspace(0.05, 0.95, x.shape[0], dtype=torch.float64)
    s = ALL_SCHEDULES[name](t)
    a, b, da, db = (v[:, None] for v in (s.alpha, s.beta, s.d_alpha, s.d_beta))
    expected = (b**2 * da / a - db * b) * score + (da / a) * x
    torch.testing.assert_close(path.convert(score, "score", "velocity", x, t), expected, rtol=1e-10, atol=1e-10)


#: each of the twelve conversions written out by hand from x = alpha z + beta eps (course Section 3), independent of
#: the coefficient table that both PathSample's targets and GaussianPath.convert use; p is the prediction
HAND_CONVERSIONS = {
    ("data", "noise"): lambda p, x, a, b, da, db: (x - a * p) / b,
    ("data", "score"): lambda p, x, a, b, da, db: -(x - a * p) / b**2,
    ("data", "velocity"): lambda p, x, a, b, da, db: da * p + db * (x - a * p) / b,
    ("noise", "data"): lambda p, x, a, b, da, db: (x - b * p) / a,
    ("noise", "score"): lambda p, x, a, b, da, db: -p / b,
    ("noise", "velocity"): lambda p, x, a, b, da, db: da * (x - b * p) / a + db * p,
    ("score", "data"): lambda p, x, a, b, da, db: (x + b**2 * p) / a,
    ("score", "noise"): lambda p, x, a, b, da, db: -b * p,
    ("score", "velocity"): lambda p, x, a, b, da, db: (b**2 * da / a - db * b) * p + (da / a) * x,
    ("velocity", "data"): lambda p, x, a, b, da, db: (b * p - db * x) / (b * da - a * db),
    ("velocity", "noise"): lambda p, x, a, b, da, db: (a * p - da * x) / (a * db - b * da),
    ("velocity", "score"): lambda p, x, a, b, da, db: -(a * p - da * x) / (a * db - b * da) / b,
}


@pytest.mark.parametrize("name", ALL_SCHEDULES)
@pytest.mark.parametrize("src,dst", list(HAND_CONVERSIONS))
def test_each_conversion_matches_its_formula_written_out(name, src, dst):
    path = GaussianPath(ALL_SCHEDULES[name])
    x, pred = _batch()
    t = torch.linspace(0.05, 0.95, x.shape[0], dtype=torch.float64)
    s = ALL_SCHEDULES[name](t)
    coeffs = [v[:, None] for v in (s.alpha, s.beta, s.d_alpha, s.d_beta)]
    expected = HAND_CONVERSIONS[(src, dst)](pred, x, *coeffs)
    torch.testing.assert_close(path.convert(pred, src, dst, x, t), expected, rtol=1e-9, atol=1e-9)


def test_time_ranges_follow_the_divisions():
    condot = GaussianPath(ALL_SCHEDULES["condot"])
    m = 1e-3
    assert objective_of("cfm").sample_time_range(condot) == (0.0, 1.0)
    assert objective_of("cfm").sample_time_range(condot, stochastic=True) == (0.0, 1 - m)
    assert objective_of("noise").sample_time_range(condot) == (m, 1.0)
    assert objective_of("data").sample_time_range(condot) == (0.0, 1 - m)
    assert objective_of("score").sample_time_range(condot) == (m, 1 - m)
    assert objective_of("score").train_time_range(condot) == (0.0, 1 - m)
    assert objective_of("noise").train_time_range(condot) == (0.0, 1.0)
    # VP has alpha_0 > 0, so noise prediction may start at 0; its d_beta diverges at 1
    vp = GaussianPath(ALL_SCHEDULES["linear_vp"])
    assert objective_of("noise").sample_time_range(vp) == (0.0, 1 - m)
    assert objective_of("cfm").train_time_range(GaussianPath(ALL_SCHEDULES["sqrt"])) == (0.0, 1 - m)


def test_training_start_and_end_of_sampling_have_their_own_margins():
    """One margin used to set the training range, the sampling start and the sampling end at once."""
    condot = GaussianPath(ALL_SCHEDULES["condot"])
    score = objective_of("score", train_margin=1e-3, sample_margins=(0.05, 0.02))
    assert score.train_time_range(condot) == (0.0, 1 - 1e-3)
    assert score.sample_time_range(condot) == (0.05, 1 - 0.02)
    # a checkpoint from before the split (objective.margin) keeps its meaning
    legacy = objective_of("score", margin=0.05)
    assert legacy.train_time_range(condot) == (0.0, 0.95) and legacy.sample_time_range(condot) == (0.05, 0.95)
    with pytest.raises(ValueError, match="margins"):
        objective_of("cfm", sample_margins=(0.0, 0.6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_schedules_are_exact_at_their_ends_in_every_dtype(name, dtype):
    """t = 1 is data (alpha 1, beta exactly +0) and t = 0 noise (beta 1; alpha 0 except the VP schedule) in the
    dtype in use, so that a division by beta_1 is seen as singular: cos(pi / 2) is -4.4e-8 in float32."""
    ends = ALL_SCHEDULES[name](torch.tensor([0.0, 1.0], dtype=dtype))
    assert ends.alpha[1].item() == 1.0 and ends.beta[1].item() == 0.0 and not torch.signbit(ends.beta[1])
    assert ends.beta[0].item() == pytest.approx(1.0, abs=1e-4)
    if name != "linear_vp":
        assert ends.alpha[0].item() == 0.0 and ends.beta[0].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_time_range_is_decided_in_the_dtype_in_use(name, dtype):
    """Score -> velocity divides by beta, which vanishes at t = 1 on every schedule: no dtype may call t = 1 safe."""
    obj = objective_of("score", sample_margins=(0.05, 0.02))
    assert obj.sample_time_range(GaussianPath(ALL_SCHEDULES[name]), dtype=dtype)[1] == 1 - 0.02


@pytest.mark.parametrize("objective", ["cfm", "score", "noise", "data"])
@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_conversions_finite_on_documented_range(objective, name):
    path = GaussianPath(ALL_SCHEDULES[name])
    obj = objective_of(objective)
    lo, hi = obj.sample_time_range(path, stochastic=True)
    x, pred = _batch(2)
    for t0 in (lo, hi):
        t = torch.full((2,), t0, dtype=torch.float64)
        assert torch.isfinite(obj.to_velocity(path, pred, x, t)).all()
        assert torch.isfinite(obj.to_score(path, pred, x, t)).all()
    lo, hi = obj.train_time_range(path)
    z, eps = _batch(2)
    for t0 in (lo, hi):
        assert torch.isfinite(obj.target(path.sample(z, eps, torch.full((2,), t0, dtype=torch.float64)))).all()


def test_interpolant_path():
    path = NoisyInterpolantPath(CondOTSchedule(), sigma=0.0)
    z, x0 = _batch()
    t = torch.rand(z.shape[0], dtype=torch.float64)
    ps = path.sample(z, x0, t)
    torch.testing.assert_close(ps.x_t, t[:, None] * z + (1 - t[:, None]) * x0)
    torch.testing.assert_close(ps.velocity, z - x0)
    noisy = NoisyInterpolantPath(CondOTSchedule(), sigma=0.1).sample(z, x0, t)
    resid = noisy.x_t - ps.x_t
    assert 0.08 < resid.std().item() < 0.12
    with pytest.raises(ValueError, match="Gaussian source"):
        objective_of("score").check_path(path)
    with pytest.raises(ValueError, match="cfm"):
        ps.target("score")
