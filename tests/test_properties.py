"""Property tests (hypothesis): on each objective's documented time range and for any finite input, the path's
conversions, targets and losses and every sampler return finite numbers, in float32 and float64.

"Finite input" means magnitudes up to 1e4 (images and 2D data are O(1); 1e4 leaves room for a bad network) and
down to 0: the property is about the singular ends of the paths (t = 0, t = 1, alpha or beta at 0, derivatives
that diverge), not about float overflow of inputs near the dtype's largest number.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ALL_SCHEDULES
from flowdiff.model import FlowModel
from flowdiff.nets import MLP
from flowdiff.paths import GaussianPath
from helpers import OBJECTIVE_FILES, SAMPLER_FILES, objective_of, sampler_from_conf

DTYPES = {"float32": torch.float32, "float64": torch.float64}
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

schedules = st.sampled_from(sorted(ALL_SCHEDULES))
objectives = st.sampled_from(sorted(OBJECTIVE_FILES))
dtypes = st.sampled_from(sorted(DTYPES))
fractions = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))  # the ends, where things go wrong, often
magnitudes = st.one_of(st.just(0.0), st.floats(1e-6, 1e4))


def _values(seed: int, scale: float, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _at(lo: float, hi: float, frac: float, n: int, dtype: torch.dtype) -> torch.Tensor:
    t = torch.full((n,), lo + (hi - lo) * frac, dtype=torch.float64).to(dtype)
    return t.clamp(lo, hi)  # rounding to float32 must not step outside the range


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


@PROPERTY
@given(schedules, objectives, dtypes, fractions, magnitudes, magnitudes, st.integers(0, 2**31), st.booleans())
def test_conversions_are_finite_on_the_sampling_range(schedule, objective, dtype, frac, x_scale, p_scale, seed, sde):
    """to_velocity (ODEs) and to_score (SDEs) on ``sample_time_range``; to_data where it is used, at the range's end
    (the last denoising step; at t = 0 it is singular for the polynomial schedule, whose d_alpha vanishes there)."""
    dtype = DTYPES[dtype]
    path, obj = GaussianPath(ALL_SCHEDULES[schedule]), objective_of(objective)
    lo, hi = obj.sample_time_range(path, stochastic=sde, dtype=dtype)
    t = _at(lo, hi, frac, 8, dtype)
    x, pred = _values(seed, x_scale, (8, 2), dtype), _values(seed + 1, p_scale, (8, 2), dtype)
    assert _finite(obj.to_velocity(path, pred, x, t)), (lo, hi, float(t[0]))
    assert _finite(obj.to_data(path, pred, x, _at(lo, hi, 1.0, 8, dtype))), (lo, hi)
    if sde:
        assert _finite(obj.to_score(path, pred, x, t)), (lo, hi, float(t[0]))


@PROPERTY
@given(schedules, objectives, dtypes, fractions, magnitudes, magnitudes, st.integers(0, 2**31))
def test_targets_and_losses_are_finite_on_the_training_range(schedule, objective, dtype, frac, z_scale, p_scale, seed):
    dtype = DTYPES[dtype]
    path, obj = GaussianPath(ALL_SCHEDULES[schedule]), objective_of(objective)
    obj_weighted = objective_of(objective, weighting="beta_sq")
    lo, hi = obj.train_time_range(path, dtype=dtype)
    t = _at(lo, hi, frac, 8, dtype)
    z, eps = _values(seed, z_scale, (8, 2), dtype), _values(seed + 1, 1.0, (8, 2), dtype)
    sample = path.sample(z, eps, t)
    assert _finite(sample.x_t) and _finite(obj.target(sample)), (lo, hi, float(t[0]))
    pred = _values(seed + 2, p_scale, (8, 2), dtype)
    assert math.isfinite(float(obj.loss(pred, sample, path)))
    assert math.isfinite(float(obj_weighted.loss(pred, sample, path)))


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    net = MLP(data_shape=[2], width=16, depth=2)
    return {torch.float32: net, torch.float64: MLP(data_shape=[2], width=16, depth=2).double()}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(sorted(SAMPLER_FILES)),
    schedules,
    objectives,
    dtypes,
    st.floats(1e-3, 1e3),
    st.integers(1, 6),
    st.integers(0, 2**31),
    st.sampled_from(["uniform", "edm", "logsnr", "shift"]),
)
def test_every_sampler_stays_finite(nets, sampler, schedule, objective, dtype, scale, steps, seed, grid):
    """Any sampler on any time grid, path and objective, from any finite start, with an untrained network: a
    finite answer."""
    dtype = DTYPES[dtype]
    path = GaussianPath(ALL_SCHEDULES[schedule])
    kw = {"steps": steps, "grid": grid} if sampler != "dopri5" else {"steps": steps, "rtol": 1e-3, "atol": 1e-3}
    module = FlowModel(nets[dtype], path, objective_of(objective), data_shape=(2,))
    module.sampler = sampler_from_conf(sampler, path=path, **kw)
    x0 = _values(seed, scale, (16, 2), dtype)
    out = module.sample(16, x0=x0, generator=torch.Generator().manual_seed(seed))
    assert out.x.dtype == dtype and _finite(out.x), (sampler, schedule, objective)
