"""Straightness E int ||(X_1 - X_0) - v(X_t, t)||^2 dt against closed forms on Gaussian data."""

import math

import pytest
import torch

from flowdiff.model import FlowModel
from flowdiff.nets import MLP
from flowdiff.paths import CondOTSchedule, GaussianPath
from flowdiff.straightness import straightness
from helpers import objective_of
from test_samplers import GaussianOracle


def _unit_norm_starts(n: int, d: int) -> torch.Tensor:
    """Starting points with ||x0||^2 = d exactly: S is ||x0||^2 times a function of t, so no sampling error."""
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(d)


def _closed_form(s: float, d: int) -> float:
    """CondOT, data N(mu, s^2 I): X_t = t mu + c(t) X_0 with c(t) = sqrt(t^2 s^2 + (1 - t)^2), so
    (X_1 - X_0) - v_t = (s - 1 - c'(t)) X_0 and S = d (int_0^1 c'(t)^2 dt - (s - 1)^2)."""
    t = torch.linspace(0, 1, 2_000_001, dtype=torch.float64)
    c = torch.sqrt(t**2 * s**2 + (1 - t) ** 2)
    dc = (t * s**2 - (1 - t)) / c
    integral = float(torch.trapezoid(dc**2, t))
    return d * (integral - (s - 1) ** 2)


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0])
def test_straightness_of_the_gaussian_flow_matches_its_closed_form(s):
    mu, d = torch.tensor([1.0, -2.0], dtype=torch.float64), 2
    oracle = GaussianOracle(CondOTSchedule(), mu, s)
    value, x1 = straightness(lambda x, t: oracle.prediction("velocity", x, t), _unit_norm_starts(64, d), steps=2000)
    exact = _closed_form(s, d)
    assert exact > 0.01 and value == pytest.approx(exact, rel=0.01), (value, exact)
    # and the Euler trajectories end where the flow map sends their starts
    assert torch.allclose(x1, oracle.flow(_unit_norm_starts(64, d), 0.0, 1.0), atol=5e-3)


def test_a_straight_flow_has_straightness_zero_at_any_step_count():
    """A point mass (s = 0): X_t = t mu + (1 - t) X_0, straight at constant speed; S = 0 to rounding."""
    oracle = GaussianOracle(CondOTSchedule(), torch.tensor([3.0, 1.0], dtype=torch.float64), 0.0)
    for steps in (1, 7, 100):
        value, _ = straightness(lambda x, t: oracle.prediction("velocity", x, t), _unit_norm_starts(32, 2), steps=steps)
        assert value < 1e-20


def test_module_straightness_uses_the_models_own_ode():
    """FlowModule.straightness of a random net equals the function applied to that net's velocity from the same
    starting points; and it is positive (a random field is not straight)."""
    torch.manual_seed(0)
    path = GaussianPath(CondOTSchedule())
    module = FlowModel(MLP(data_shape=[2], width=16, depth=2), path, objective_of("cfm"), data_shape=(2,))
    value = module.straightness(200, steps=50, generator=torch.Generator().manual_seed(4))
    x0 = torch.randn((200, 2), generator=torch.Generator().manual_seed(4))
    direct, _ = straightness(module.vector_fields().velocity, x0, (0.0, 1.0), 50)
    assert value == pytest.approx(direct, rel=1e-6) and value > 1e-4
    with pytest.raises(ValueError, match="at least one step"):
        straightness(module.vector_fields().velocity, x0, steps=0)
