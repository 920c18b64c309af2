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
