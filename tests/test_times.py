"""Training-time distributions: pi-0's Beta and SD3's logit-normal match their densities; uniform keeps its stream."""

import pytest
import torch
from scipy import stats

from flowdiff.build import build_datamodule, build_model
from flowdiff.objectives import Objective
from flowdiff.times import BetaTimes, LogitNormalTimes, UniformTimes
from helpers import compose_cfg


@pytest.mark.parametrize(
    "dist, reference",
    [
        (BetaTimes(), lambda u: 1 - stats.beta(1.5, 1.0).cdf(1 - u / 0.999)),  # openpi: Beta(1.5, 1) * 0.999 + 0.001
        (BetaTimes(2.0, 3.0, 1.0), lambda u: 1 - stats.beta(2.0, 3.0).cdf(1 - u)),  # beta != 1: SciPy's inverse
        (LogitNormalTimes(0.5, 0.8), lambda u: stats.norm(0.5, 0.8).cdf(stats.logistic.ppf(u))),
        (UniformTimes(), lambda u: u),
    ],
)
def test_time_draws_match_their_distribution(dist, reference):
    """Kolmogorov-Smirnov against SciPy's distributions (written independently of flowdiff's cdf): p > 0.01 at
    n = 20,000; and flowdiff's own cdf agrees with SciPy's; and the draws are reproducible from a generator."""
    u = dist.draw(20_000, torch.Generator().manual_seed(0)).double()
    assert 0 <= u.min() and u.max() <= 1
    assert stats.kstest(u.numpy(), reference).pvalue > 0.01
    grid = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(dist.cdf(grid).double(), torch.as_tensor(reference(grid.numpy())), atol=1e-6)
    assert torch.equal(dist.draw(5, torch.Generator().manual_seed(3)), dist.draw(5, torch.Generator().manual_seed(3)))


def test_a_wrong_distribution_is_rejected_by_the_same_test():
    """The KS check has power: Beta(1.5, 1)'s draws are not SD3's logit-normal, nor uniform."""
    u = BetaTimes().draw(20_000, torch.Generator().manual_seed(0)).double().numpy()
    assert stats.kstest(u, lambda x: x).pvalue < 1e-6
    assert stats.kstest(u, lambda x: stats.norm(0, 1).cdf(stats.logistic.ppf(x))).pvalue < 1e-6


def test_pi0_times_favour_the_noise_end():
    t = BetaTimes().draw(100_000, torch.Generator().manual_seed(1))
    assert 0.39 < t.mean() < 0.41  # E[t] = 0.999 (1 - 1.5 / 2.5) = 0.3996
    assert t.max() <= 0.999


def test_time_choice_reaches_the_loss_and_uniform_keeps_its_stream(tmp_path):
    """time=beta builds BetaTimes into the objective; the loss sees its times (they move the loss); uniform draws
    exactly what the loss always drew (lo + (hi - lo) * rand), so documented numbers stay."""
    losses = {}
    for choice in ("uniform", "beta", "logit_normal"):
        cfg = compose_cfg(["data=moons", f"time={choice}"], tmp_path / choice)
        model = build_model(cfg, build_datamodule(cfg))
        assert (
            type(model.objective.time_distribution).__name__
            == {
                "uniform": "UniformTimes",
                "beta": "BetaTimes",
                "logit_normal": "LogitNormalTimes",
            }[choice]
        )
        batch = {"x1": torch.randn(512, 2)}
        losses[choice] = float(model.loss(batch, generator=torch.Generator().manual_seed(0)))
    assert len(set(losses.values())) == 3
    lo, hi = Objective("velocity").train_time_range(model.path)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(
        Objective("velocity").train_times(7, (lo, hi), generator=g1), lo + (hi - lo) * torch.rand(7, generator=g2)
    )
