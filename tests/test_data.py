"""Toy data: shapes, labels, the published definitions, seeded fixed sets, fresh training batches."""

import math

import pytest
import torch

from flowdiff.data.datamodule import ToyDataModule
from flowdiff.data.toys import TOYS, build_toy
from flowdiff.metrics import w2


@pytest.mark.parametrize("name", list(TOYS))
def test_every_toy_draws_labelled_points(name):
    toy = build_toy(name)
    x, y = toy.sample(1000, torch.Generator().manual_seed(0))
    assert x.shape == (1000, 2) and y.shape == (1000,) and torch.isfinite(x).all()
    if toy.num_classes:
        assert set(y.unique().tolist()) == set(range(toy.num_classes))


def test_definitions_match_the_runner():
    g = torch.Generator().manual_seed(0)
    # moons: unit circles (centres (0,0) and (1,0.5)) scaled by 2, first coordinate shifted by -1
    x, y = build_toy("moons", noise=0.0).sample(500, g)
    centre = torch.where(y[:, None] == 0, torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.5]))
    radius = ((x + torch.tensor([1.0, 0.0])) / 2 - centre).norm(dim=1)
    torch.testing.assert_close(radius, torch.ones(500))
    # 8gaussians: equal counts on a radius-5 circle, std 1
    x, y = build_toy("8gaussians").sample(8000, g)
    assert torch.bincount(y).tolist() == [1000] * 8
    angle = 2 * math.pi * y / 8
    resid = x - 5 * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    assert resid.std().item() == pytest.approx(1.0, abs=0.03)
    # checkerboard: only black squares (row + col even) of the 4 x 4 board on [-5, 5]^2
    x, _ = build_toy("checkerboard").sample(4000, g)
    cells = torch.floor((x + 5) / 2.5).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all() and x.abs().max() <= 5


def test_finite_sample_floor_matches_anchor():
    """ANCHORS.md: W2 between two 5,000-point moons samples of the runner's definition is about 0.04."""
    toy = build_toy("moons")
    floor = w2(
        toy.sample(5000, torch.Generator().manual_seed(0))[0], toy.sample(5000, torch.Generator().manual_seed(1))[0]
    )
    assert 0.03 < floor < 0.05


def test_datamodule_fixed_sets_and_fresh_batches():
    a, b = ToyDataModule("moons", seed=3), ToyDataModule("moons", seed=3)
    assert torch.equal(a.val_set["x1"], b.val_set["x1"]) and torch.equal(a.test_set["x1"], b.test_set["x1"])
    assert not torch.equal(a.val_set["x1"], a.test_set["x1"])
    batches = list(a.train_dataloader())
    assert len(batches) == a.steps_per_epoch and batches[0]["x1"].shape == (256, 2)
    assert not torch.equal(batches[0]["x1"], batches[1]["x1"])
    d2d = ToyDataModule("8gaussians", source="moons", batch_size=32)
    batch = next(iter(d2d.train_dataloader()))
    assert batch["x0"].shape == (32, 2) and not d2d.gaussian_source
