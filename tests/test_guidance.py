"""Classifier-free guidance: w = 1 conditional, w = 0 unconditional, the mixture otherwise, one forward each."""

import pytest
import torch

from flowdiff.guidance import ClassifierFreeGuidance
from flowdiff.paths import CosineSchedule, GaussianPath
from helpers import OBJECTIVE_FILES, objective_of


class CountingNet:
    def __init__(self):
        self.forwards = 0
        self.emb = torch.randn(11, 2, dtype=torch.float64)

    def __call__(self, x, t, y):
        self.forwards += 1
        return torch.sin(x) * t[:, None] + self.emb[y]


def test_cfg_scales_and_forward_count():
    net, cfg = CountingNet(), ClassifierFreeGuidance(null_label=10, p_uncond=0.1)
    x, t, y = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64), torch.arange(6)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 10))
    net.forwards = 0
    torch.testing.assert_close(cfg.guided(net, x, t, y, scale=1.0), cond)
    torch.testing.assert_close(cfg.guided(net, x, t, y, scale=0.0), uncond)
    torch.testing.assert_close(cfg.guided(net, x, t, y, scale=3.0), -2 * uncond + 3 * cond)
    assert net.forwards == 3  # one (doubled-batch) forward per evaluation


@pytest.mark.parametrize("objective", list(OBJECTIVE_FILES))
def test_guiding_predictions_equals_guiding_velocities(objective):
    path, obj = GaussianPath(CosineSchedule()), objective_of(objective)
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 0.8 + 0.1
    p_null, p_cond, w = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), 4.0
    mixed = obj.to_velocity(path, (1 - w) * p_null + w * p_cond, x, t)
    separately = (1 - w) * obj.to_velocity(path, p_null, x, t) + w * obj.to_velocity(path, p_cond, x, t)
    torch.testing.assert_close(mixed, separately)


def test_label_dropout_rate():
    cfg = ClassifierFreeGuidance(null_label=10, p_uncond=0.2)
    y = torch.randint(0, 10, (50_000,))
    dropped = cfg.drop_labels(y, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 10).float().mean().item()
    assert frac == pytest.approx(0.2, abs=0.01)
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(null_label=10, p_uncond=1.5)
