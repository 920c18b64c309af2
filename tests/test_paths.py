"""Gaussian path: ends, velocity = d/dt x_t, the twelve conversions, the course's formula, safe ranges."""

import itertools

import pytest
import torch

from conftest import ALL_SCHEDULES
from flowdiff.objectives import Objective
from flowdiff.paths import PARAMETERISATIONS, CondOTSchedule, GaussianPath, NoisyInterpolantPath


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


def test_time_ranges_follow_the_divisions():
    condot = GaussianPath(ALL_SCHEDULES["condot"])
    m = 1e-3
    assert Objective.from_name("cfm").sample_time_range(condot) == (0.0, 1.0)
    assert Objective.from_name("cfm").sample_time_range(condot, stochastic=True) == (0.0, 1 - m)
    assert Objective.from_name("noise").sample_time_range(condot) == (m, 1.0)
    assert Objective.from_name("data").sample_time_range(condot) == (0.0, 1 - m)
    assert Objective.from_name("score").sample_time_range(condot) == (m, 1 - m)
    assert Objective.from_name("score").train_time_range(condot) == (0.0, 1 - m)
    assert Objective.from_name("noise").train_time_range(condot) == (0.0, 1.0)
    # VP has alpha_0 > 0, so noise prediction may start at 0; its d_beta diverges at 1
    vp = GaussianPath(ALL_SCHEDULES["linear_vp"])
    assert Objective.from_name("noise").sample_time_range(vp) == (0.0, 1 - m)
    assert Objective.from_name("cfm").train_time_range(GaussianPath(ALL_SCHEDULES["sqrt"])) == (0.0, 1 - m)


@pytest.mark.parametrize("objective", ["cfm", "score", "noise", "data"])
@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_conversions_finite_on_documented_range(objective, name):
    path = GaussianPath(ALL_SCHEDULES[name])
    obj = Objective.from_name(objective)
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
        Objective.from_name("score").check_path(path)
    with pytest.raises(ValueError, match="cfm"):
        ps.target("score")
