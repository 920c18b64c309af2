"""2D toy distributions, each drawn in one vectorised call with labels for conditional training.

Definitions follow torchcfm's runner (`runner/src/datamodules/distribution_datamodule.py`, see
shared/ANCHORS.md) where it has the dataset, so W2 numbers are comparable with Tong et al.:

* ``moons``: sklearn's two moons (evenly spaced angles, Gaussian noise 0.05), times 2, minus 1 on the
  first coordinate; label = moon.
* ``scurve``: sklearn's S-curve (noise 0.05), coordinates (0, 2), times 1.5; label = half of the S.
* ``8gaussians``: 8 components of std 1 on a circle of radius 5, equal counts; label = component.

and the others are the usual ones: ``circles`` (sklearn's two rings, times 3, label = ring), ``checkerboard``
(course lab 2: a grid x grid board over [-scale, scale]^2, label = black square), ``spirals``
(two arms, label = arm), ``gmm`` (course lab 2: a Gaussian mixture with analytic density and
score, label = component) and ``gaussian`` (the standard normal, a source).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdiff.densities import GaussianMixture


class Toy:
    """A 2D distribution: ``sample(n, generator) -> (x (n, 2), y (n,))``."""

    dim: int = 2
    num_classes: int = 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def points(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, 2)`` draws without their labels: the source of a flow from this distribution."""
        return self.sample(n, generator)[0]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def _rand(n: int, g: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=g)


def _randn(*shape: int, g: torch.Generator | None) -> Tensor:
    return torch.randn(*shape, generator=g)


def _evenly_spaced_halves(
    n: int, span: float, g: torch.Generator | None, endpoint: bool = True
) -> tuple[Tensor, Tensor]:
    """sklearn's moons/circles scheme: ``n // 2`` angles evenly spaced on ``[0, span]`` for label 0, the rest
    for label 1, in a random order. The even spacing lowers the finite-sample W2 floor (see ANCHORS.md)."""
    halves = []
    for k in (n // 2, n - n // 2):
        halves.append(torch.linspace(0, span, k + (0 if endpoint else 1))[:k] if k else torch.zeros(0))
    y = torch.cat([torch.zeros(len(halves[0]), dtype=torch.long), torch.ones(len(halves[1]), dtype=torch.long)])
    perm = torch.randperm(n, generator=g)
    return y[perm], torch.cat(halves)[perm]


class StandardGaussian(Toy):
    """``N(0, std^2 I)``; unlabelled."""

    def __init__(self, std: float = 1.0, dim: int = 2) -> None:
        self.std = std
        self.dim = dim

    def sample(self, n, generator=None):
        return self.std * _randn(n, self.dim, g=generator), torch.zeros(n, dtype=torch.long)


class Moons(Toy):
    num_classes = 2

    def __init__(self, noise: float = 0.05, scale: float = 2.0, shift: float = -1.0) -> None:
        self.noise, self.scale, self.shift = noise, scale, shift

    def sample(self, n, generator=None):
        y, theta = _evenly_spaced_halves(n, math.pi, generator)
        outer = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        inner = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
        x = torch.where(y[:, None] == 0, outer, inner) + self.noise * _randn(n, 2, g=generator)
        x = x * self.scale
        x[:, 0] += self.shift
        return x, y


class SCurve(Toy):
    num_classes = 2

    def __init__(self, noise: float = 0.05, scale: float = 1.5) -> None:
        self.noise, self.scale = noise, scale

    def sample(self, n, generator=None):
        t = 3 * math.pi * (_rand(n, generator) - 0.5)
        x = torch.stack([torch.sin(t), torch.sign(t) * (torch.cos(t) - 1)], 1)
        x = x + self.noise * _randn(n, 2, g=generator)
        return self.scale * x, (t > 0).long()


class EightGaussians(Toy):
    num_classes = 8

    def __init__(self, radius: float = 5.0, std: float = 1.0, n_modes: int = 8) -> None:
        self.radius, self.std, self.n_modes = radius, std, n_modes
        self.num_classes = n_modes

    def sample(self, n, generator=None):
        # equal counts per component (as torchdyn's generator), in a random order
        y = (torch.arange(n) % self.n_modes)[torch.randperm(n, generator=generator)]
        angle = 2 * math.pi * y / self.n_modes
        centres = self.radius * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
        return centres + self.std * _randn(n, 2, g=generator), y


class Circles(Toy):
    num_classes = 2

    def __init__(self, factor: float = 0.5, noise: float = 0.05, scale: float = 3.0) -> None:
        self.factor, self.noise, self.scale = factor, noise, scale

    def sample(self, n, generator=None):
        y, theta = _evenly_spaced_halves(n, 2 * math.pi, generator, endpoint=False)
        r = torch.where(y == 0, torch.ones(n), torch.full((n,), self.factor))
        x = r[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        return self.scale * (x + self.noise * _randn(n, 2, g=generator)), y


class Checkerboard(Toy):
    """Uniform on the black squares of a ``grid x grid`` board covering ``[-scale, scale]^2``."""

    def __init__(self, grid: int = 4, scale: float = 5.0) -> None:
        if grid % 2:
            raise ValueError("checkerboard needs an even grid size")
        self.grid, self.scale = grid, scale
        self.num_classes = grid * grid // 2

    def sample(self, n, generator=None):
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        row = y // (self.grid // 2)
        col = 2 * (y % (self.grid // 2)) + row % 2  # black squares: row + col even
        cell = 2 * self.scale / self.grid
        u = torch.rand(n, 2, generator=generator)
        x = torch.stack([col + u[:, 0], row + u[:, 1]], 1) * cell - self.scale
        return x, y


class Spirals(Toy):
    num_classes = 2

    def __init__(self, noise: float = 0.1, scale: float = 1.0, turns: float = 1.5) -> None:
        self.noise, self.scale, self.turns = noise, scale, turns

    def sample(self, n, generator=None):
        y = (_rand(n, generator) < 0.5).long()
        s = torch.sqrt(_rand(n, generator))  # uniform density along the arm's area
        theta = 2 * math.pi * self.turns * s
        r = 3 * s
        sign = 1 - 2 * y.float()
        x = sign[:, None] * torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
        return self.scale * (x + self.noise * _randn(n, 2, g=generator)), y


class MixtureToy(Toy):
    """The course's lab-2 Gaussian mixture (symmetric modes, std 1, radius 10): analytic density and score.

    Drawn stratified (equal counts per mode, as ``8gaussians``) so the finite-sample W2 floor stays low.
    """

    def __init__(self, n_modes: int = 5, std: float = 1.0, scale: float = 10.0) -> None:
        self.n_modes, self.std, self.scale = n_modes, std, scale
        self.num_classes = n_modes
        self.mixture = GaussianMixture.symmetric(n_modes, std, scale)

    def sample(self, n, generator=None):
        return self.mixture.sample(n, generator, stratified=True)


TOYS: dict[str, type[Toy]] = {
    "gaussian": StandardGaussian,
    "moons": Moons,
    "scurve": SCurve,
    "8gaussians": EightGaussians,
    "circles": Circles,
    "checkerboard": Checkerboard,
    "spirals": Spirals,
    "gmm": MixtureToy,
}


def build_toy(name: str, **params) -> Toy:
    if name not in TOYS:
        raise ValueError(f"unknown 2D dataset {name!r}; choose one of {', '.join(TOYS)}")
    return TOYS[name](**params)
