"""Training objectives: what the network predicts, its regression target and loss, and how a
prediction becomes the velocity (ODE sampling) or the score (SDE sampling).

============  ============  ===============================  =========================================
objective     predicts      target                           time range it keeps to (CondOT path)
============  ============  ===============================  =========================================
``cfm``       velocity      ``d_alpha z + d_beta eps``       [0, 1] (ODE); SDE needs the score: [0, 1-m]
``score``     score         ``-eps / beta``                  [m, 1-m]: target and conversion divide by beta, alpha
``noise``     noise         ``eps``                          [m, 1]: noise -> velocity divides by alpha
``data``      data          ``z``                            [0, 1-m]: data -> velocity divides by beta
============  ============  ===============================  =========================================

``m`` is ``margin`` (1e-3 by default); the ranges are derived from the schedule by
:meth:`GaussianPath.time_range`, so e.g. the VP schedule (``alpha_0 > 0``) lets the noise
objective start at 0, and the sqrt schedule (``d_beta`` infinite at 1) ends every range at ``1 - m``.
All conversions are :meth:`GaussianPath.convert`; nothing here repeats the algebra.

Near a singular end the converted field is stiff: for the data objective on CondOT,
``u = (z_hat - x) / (1 - t)``. Samplers that evaluate at the last grid time (heun, rk4) then
lose accuracy there (max error about 0.1 at 50 Heun steps on Gaussian data); ``ddim``, which
integrates that linear part exactly, ``midpoint`` and ``euler`` do not.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from flowdiff.paths.gaussian import PathSample

OBJECTIVES: dict[str, str] = {"cfm": "velocity", "score": "score", "noise": "noise", "data": "data"}
Weighting = Literal["none", "beta_sq"]


class Objective:
    """Regress the network onto the conditional ``prediction`` target of the path.

    ``weighting="beta_sq"`` multiplies the loss by ``beta_t^2`` (the denoising-score-matching
    weight that turns the score loss into the noise-prediction loss); ``"none"`` is plain MSE.
    """

    def __init__(self, prediction: str, weighting: Weighting = "none", margin: float = 1e-3) -> None:
        if prediction not in OBJECTIVES.values():
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(OBJECTIVES.values())}")
        if weighting not in ("none", "beta_sq"):
            raise ValueError(f"unknown weighting {weighting!r}; choose none or beta_sq")
        self.prediction = prediction
        self.weighting = weighting
        self.margin = margin

    @classmethod
    def from_name(cls, name: str, **kwargs) -> Objective:
        """``cfm``, ``score``, ``noise`` or ``data``."""
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
        return cls(OBJECTIVES[name], **kwargs)

    def __repr__(self) -> str:
        return f"Objective(prediction={self.prediction!r}, weighting={self.weighting!r})"

    def check_path(self, path) -> None:
        """Fail with one sentence if ``path`` cannot provide this objective's target."""
        if self.prediction not in path.parameterisations:
            raise ValueError(
                f"the {self.prediction} objective needs a Gaussian source; with a data-to-data path use objective=cfm"
            )

    def train_time_range(self, path) -> tuple[float, float]:
        """Times drawn for training: where the target is finite."""
        return path.time_range(targets=[self.prediction], margin=self.margin)

    def sample_time_range(self, path, stochastic: bool = False) -> tuple[float, float]:
        """Times a sampler may visit: where the conversion to velocity (and to score for SDEs) is finite."""
        conversions = [(self.prediction, "velocity")] + ([(self.prediction, "score")] if stochastic else [])
        return path.time_range(conversions, margin=self.margin)

    def target(self, sample: PathSample) -> Tensor:
        return sample.target(self.prediction)

    def loss(self, prediction: Tensor, sample: PathSample, path) -> Tensor:
        """Mean over the batch of ``w(t) * mean_features (prediction - target)^2``."""
        err = (prediction - self.target(sample)).pow(2).flatten(1).mean(1)  # (B,)
        if self.weighting == "beta_sq":
            err = err * path.schedule(sample.t).beta ** 2
        return err.mean()

    def to_velocity(self, path, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return path.convert(prediction, self.prediction, "velocity", x_t, t)

    def to_score(self, path, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return path.convert(prediction, self.prediction, "score", x_t, t)
