"""Course lab 1 by Monte Carlo: Brownian motion, Ornstein-Uhlenbeck, Langevin dynamics; the mixture's score."""

import math

import pytest
import torch

from flowdiff.densities import GaussianMixture
from flowdiff.dynamics import BrownianMotion, LangevinDynamics, OrnsteinUhlenbeck
from flowdiff.metrics import w2


def test_brownian_motion_variance_grows_like_sigma2_t():
    sigma, n = 0.7, 20_000
    out = BrownianMotion(sigma).simulate(
        torch.zeros(n, 1), t_end=2.0, steps=200, return_trajectory=True, generator=torch.Generator().manual_seed(0)
    )
    for k in (50, 100, 200):  # t = 0.5, 1, 2
        t = out.times[k].item()
        var = out.trajectory[k].var().item()
        assert var == pytest.approx(sigma**2 * t, rel=0.05), (t, var)  # sd of the estimate ~1%


def test_ou_reaches_its_stationary_variance():
    ou = OrnsteinUhlenbeck(theta=2.0, sigma=1.5)
    x0 = torch.full((20_000, 1), 5.0)  # start far away: 10 relaxation times later only e^-20 remains
    out = ou.simulate(x0, t_end=5.0, steps=1000, generator=torch.Generator().manual_seed(1))
    assert out.x.mean().item() == pytest.approx(0.0, abs=0.05)
    assert out.x.var().item() == pytest.approx(ou.stationary_variance, rel=0.05)  # 0.5625


def test_langevin_reaches_the_mixture():
    """Lab-1 Langevin on a 5-mode mixture (lab 1's modes, scale 4 so the modes mix within t = 10).

    Bound: 1.5 x the finite-sample floor W2(ref, ref') of two exact 2,000-point samples; the
    discretisation bias (h = 0.01) and residual mixing must fit in the 50% slack. The source
    N(0, 20 I) sits ~20x the floor away, and lab 1's own sigma = 0.6 for t = 5 is still ~4x away.
    """
    gmm = GaussianMixture.random(n_modes=5, std=0.75, scale=4.0, seed=3)
    n = 2000
    ref, _ = gmm.sample(n, torch.Generator().manual_seed(1))
    ref2, _ = gmm.sample(n, torch.Generator().manual_seed(2))
    floor = w2(ref, ref2)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(3)) * math.sqrt(20)
    out = LangevinDynamics(gmm.score, sigma=math.sqrt(2)).simulate(
        x0, t_end=10.0, steps=1000, generator=torch.Generator().manual_seed(4)
    )
    dist = w2(out.x, ref)
    assert w2(x0, ref) > 10 * floor
    assert dist < 1.5 * floor, f"W2 {dist:.3f} vs floor {floor:.3f}"


def test_mixture_score_and_path_marginal_match_autograd():
    gmm = GaussianMixture.random(n_modes=4, std=0.6, scale=5.0, seed=0).to(dtype=torch.float64)
    x = torch.randn(32, 2, dtype=torch.float64, requires_grad=True)
    alpha, beta = torch.rand(32, dtype=torch.float64), torch.rand(32, dtype=torch.float64) + 0.1
    for a, b in [(1.0, 0.0), (alpha, beta)]:
        (grad,) = torch.autograd.grad(gmm.log_prob(x, a, b).sum(), x)
        torch.testing.assert_close(gmm.score(x, a, b), grad)
    # a one-component mixture is N(mu, s^2 I): log-density in closed form
    one = GaussianMixture(torch.tensor([[1.0, -1.0]], dtype=torch.float64), 0.5)
    y = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert one.log_prob(y).item() == pytest.approx(-math.log(2 * math.pi * 0.25) - 2 / (2 * 0.25))
