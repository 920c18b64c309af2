"""Schedules: boundary values and closed-form derivatives against autograd."""

import math

import pytest
import torch

from conftest import ALL_SCHEDULES


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_boundary_values(name):
    s = ALL_SCHEDULES[name](torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert s.alpha[1] == pytest.approx(1.0, abs=1e-12)
    assert s.beta[1] == pytest.approx(0.0, abs=1e-12)
    assert s.beta[0] == pytest.approx(1.0, abs=1e-4)
    if name == "linear_vp":
        # the VP schedule only approaches pure noise: alpha_0 = exp(-(b_max + b_min) / 4)
        assert s.alpha[0] == pytest.approx(math.exp(-(20.0 + 0.1) / 4), rel=1e-10)
    else:
        assert s.alpha[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ALL_SCHEDULES)
def test_derivatives_match_autograd(name):
    t = torch.linspace(0.01, 0.99, 57, dtype=torch.float64, requires_grad=True)
    s = ALL_SCHEDULES[name](t)
    (d_alpha,) = torch.autograd.grad(s.alpha.sum(), t, retain_graph=True)
    (d_beta,) = torch.autograd.grad(s.beta.sum(), t)
    torch.testing.assert_close(s.d_alpha, d_alpha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.d_beta, d_beta, rtol=1e-10, atol=1e-12)


def test_closed_forms():
    t = torch.tensor([0.3], dtype=torch.float64)
    assert ALL_SCHEDULES["cosine"](t).alpha.item() == pytest.approx(math.sin(0.15 * math.pi))
    assert ALL_SCHEDULES["sqrt"](t).beta.item() == pytest.approx(math.sqrt(0.7))
    assert ALL_SCHEDULES["polynomial"](t).alpha.item() == pytest.approx(0.09)
    vp = ALL_SCHEDULES["linear_vp"](t)
    s = 0.7
    assert vp.alpha.item() == pytest.approx(math.exp(-0.25 * s**2 * 19.9 - 0.5 * s * 0.1))
    assert (vp.alpha**2 + vp.beta**2).item() == pytest.approx(1.0)  # variance preserving
