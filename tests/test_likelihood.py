"""Likelihood by the probability-flow ODE: closed forms for Gaussian data, Hutchinson's estimate, bits/dim."""

import math

import pytest
import torch

from flowdiff.likelihood import bits_per_dim, dequantize, log_likelihood

MU = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5, 0.8], dtype=torch.float64)


def gaussian_velocity(x, t):
    """CondOT marginal field of N(MU, diag STD^2): x_t ~ N(t MU, t^2 STD^2 + (1 - t)^2)."""
    t = t[:, None]
    var = t**2 * STD**2 + (1 - t) ** 2
    d_var = 2 * t * STD**2 - 2 * (1 - t)
    return MU + 0.5 * d_var / var * (x - t * MU)


def exact_log_prob(x):
    return (-0.5 * ((x - MU) / STD).pow(2) - STD.log() - 0.5 * math.log(2 * math.pi)).sum(1)


def test_exact_divergence_recovers_the_gaussian_log_density():
    x = MU + STD * torch.randn(300, 3, dtype=torch.float64)
    log_p, nfe = log_likelihood(gaussian_velocity, x, exact=True, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(log_p, exact_log_prob(x), atol=1e-4, rtol=0)
    assert nfe > 10


def test_hutchinson_is_unbiased_for_an_anisotropic_field():
    """Rademacher probes are exact on a diagonal Jacobian, so mix the coordinates by a rotation first."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))

    def rotated(x, t):  # the same flow in rotated coordinates: divergence unchanged, Jacobian not diagonal
        return gaussian_velocity(x @ q, t) @ q.T

    x = (MU + STD * torch.randn(400, 3, dtype=torch.float64)) @ q.T
    g = torch.Generator().manual_seed(0)
    est, _ = log_likelihood(rotated, x, exact=False, probes=1, generator=g)
    exact = exact_log_prob(x @ q)
    err = est - exact
    assert err.std() > 1e-3  # one probe is noisy per point ...
    assert abs(err.mean()) < 4 * err.std() / math.sqrt(len(err))  # ... but unbiased


def test_bits_per_dim_of_the_uniform_model_is_eight():
    """A model uniform on [-1, 1]^D gives log p = -D log 2, i.e. 8 bits per 8-bit dimension."""
    d = 12
    assert float(bits_per_dim(torch.tensor([-d * math.log(2)]), d)) == pytest.approx(8.0)


def test_dequantisation_stays_in_the_pixel_bin():
    pixels = torch.arange(256, dtype=torch.float64)
    x = pixels / 255 * 2 - 1
    deq = dequantize(x.view(1, -1), torch.Generator().manual_seed(0)).view(-1)
    lo, hi = 2 * pixels / 256 - 1, 2 * (pixels + 1) / 256 - 1
    assert ((deq >= lo) & (deq < hi)).all()


class _OracleNet(torch.nn.Module):
    """The exact ``kind`` prediction for Gaussian data (``GaussianOracle``), as a network."""

    def __init__(self, oracle, kind):
        super().__init__()
        self.oracle, self.kind = oracle, kind

    def forward(self, x, t, y=None):
        return self.oracle.prediction(self.kind, x, t)


@pytest.mark.parametrize("objective,margins", [("noise", (0.1, 1e-3)), ("score", (0.1, 0.02))])
def test_likelihood_starts_where_the_sampler_starts(objective, margins):
    """A noise (or score) model of N(MU, STD^2) is sampled from t0 = 0.1 (where noise -> velocity stops dividing by
    alpha_t = 0), starting from the moment-matched Gaussian of p_t0, which for Gaussian data *is* p_t0: its NLL is
    then the exact log-density of the data, at the end of its span (t = 1 for noise; the score model's span ends at
    0.98, where the data is scored as the ODE's state). N(0, I) at t0, today's main, is off by more than 0.1 nats."""
    from flowdiff.model import FlowModel
    from flowdiff.objectives import Objective
    from flowdiff.paths import CondOTSchedule, GaussianPath
    from test_samplers import GaussianOracle

    schedule = CondOTSchedule()
    oracle = GaussianOracle(schedule, MU, STD)
    objective = Objective(objective, sample_margins=margins)
    module = FlowModel(
        _OracleNet(oracle, objective.prediction),
        GaussianPath(schedule),
        objective,
        (3,),
        data_moments=lambda: (MU, STD**2),
    ).double()
    t0, t1 = objective.sample_time_range(module.path, dtype=torch.float64)
    assert t0 == pytest.approx(0.1) and t1 == pytest.approx(1 - margins[1] if objective.prediction == "score" else 1)
    x = MU + STD * torch.randn(200, 3, dtype=torch.float64)
    velocity = module.vector_fields().velocity
    log_p, _ = log_likelihood(
        velocity, x, (t0, t1), exact=True, rtol=1e-8, atol=1e-8, prior=lambda x0: module.start_log_prob(x0, t0)
    )
    a, b = t1, 1 - t1  # p_t1 = N(a MU, a^2 STD^2 + b^2)
    sd = torch.sqrt(a**2 * STD**2 + b**2)
    exact = (-0.5 * ((x - a * MU) / sd).pow(2) - sd.log() - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(log_p, exact, atol=1e-4, rtol=0)
    standard, _ = log_likelihood(velocity, x, (t0, t1), exact=True, rtol=1e-8, atol=1e-8)
    assert (standard - exact).abs().mean() > 0.1


def test_the_prior_is_the_law_the_sampler_starts_from():
    """What sampling draws at t0 > 0 (FlowModel.start_at of N(0, I)) has the mean and variance of the density the
    likelihood starts from (start_log_prob): both come from GaussianPath.source_moments."""
    from flowdiff.model import FlowModel
    from flowdiff.objectives import Objective
    from flowdiff.paths import CosineSchedule, GaussianPath

    net = torch.nn.Linear(3, 3).double()
    module = FlowModel(net, GaussianPath(CosineSchedule()), Objective("noise"), (3,), data_moments=lambda: (MU, STD**2))
    t0 = 0.3
    x = module.start_at(torch.randn(400_000, 3, dtype=torch.float64), t0)
    loc, scale = module.path.source_moments(t0, x, MU, STD**2)
    torch.testing.assert_close(x.mean(0), loc.squeeze(0), atol=0.01, rtol=0)
    torch.testing.assert_close(x.std(0), scale.squeeze(0), atol=0.01, rtol=0)
    # the prior is the Gaussian of those moments: its log-density at the draws averages to minus its entropy
    entropy = (0.5 * math.log(2 * math.pi * math.e) + scale.log()).sum()
    assert float(module.start_log_prob(x, t0).mean()) == pytest.approx(-float(entropy), abs=0.01)
