"""Training objectives: what the network predicts, its regression target and loss, and how a
prediction becomes the velocity (ODE sampling), the score (SDE sampling) or the data (the last step).

============  ============  ===============================  =========================================
objective     predicts      target                           sampling range on the CondOT path
============  ============  ===============================  =========================================
``cfm``       velocity      ``d_alpha z + d_beta eps``       [0, 1] (ODE); SDE needs the score: [0, 1-e]
``score``     score         ``-eps / beta``                  [s, 1-e]: the conversion divides by alpha, beta
``noise``     noise         ``eps``                          [s, 1]: noise -> velocity divides by alpha
``data``      data          ``z``                            [0, 1-e]: data -> velocity divides by beta
============  ============  ===============================  =========================================

Three time ranges, each with its own margin, applied only at an end where a quantity is infinite:

* training draws t where the conditional target is finite, kept ``train_margin`` from a singular end;
* sampling starts ``sample_margins[0]`` (``s``) from t = 0 where the conversion to a velocity divides
  by ``alpha_0 = 0``: the network's error is amplified by ``1 / alpha_t`` there (``conf/objective/noise.yaml``
  starts at 0.3);
* sampling stops ``sample_margins[1]`` (``e``) before t = 1 where a conversion or the schedule's
  derivative is infinite, and the sampler's **last step** then jumps to t = 1 with the data prediction
  ``E[z | x_t]`` (as DDPM and EDM do), instead of returning ``x_t`` with its noise of size ``beta_t``.

The ranges come from :meth:`GaussianPath.time_range` in the dtype being computed in, so e.g. the VP
schedule (``alpha_0 > 0``) lets the noise objective start at 0, and the sqrt schedule (``d_beta`` infinite
at 1) ends every sampling range at ``1 - e``. All conversions are :meth:`GaussianPath.convert`; nothing
here repeats the algebra.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from flowdiff.paths.gaussian import PARAMETERISATIONS, PathSample
from flowdiff.times import TimeDistribution, UniformTimes

Weighting = Literal["none", "beta_sq"]


class Objective:
    """Regress the network onto the conditional ``prediction`` target of the path.

    ``weighting="beta_sq"`` multiplies the loss by ``beta_t^2`` (the denoising-score-matching
    weight that turns the score loss into the noise-prediction loss); ``"none"`` is plain MSE.
    ``time_distribution`` says where training times are drawn (:mod:`flowdiff.times`; uniform if ``None``); the
    weighting stays the objective's.
    """

    def __init__(
        self,
        prediction: str,
        weighting: Weighting = "none",
        train_margin: float = 1e-3,
        sample_margins: tuple[float, float] = (1e-3, 1e-3),
        margin: float | None = None,
        time_distribution: TimeDistribution | None = None,
    ) -> None:
        if margin is not None:  # checkpoints written before the margins were split: one margin did all three jobs
            train_margin, sample_margins = margin, (margin, margin)
        sample_margins = tuple(float(m) for m in sample_margins)
        if len(sample_margins) != 2 or not all(0 < m < 0.5 for m in (train_margin, *sample_margins)):
            raise ValueError(
                f"objective margins must lie in (0, 0.5): train_margin={train_margin}, sample_margins={sample_margins}"
            )
        if prediction not in PARAMETERISATIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PARAMETERISATIONS)}")
        if weighting not in ("none", "beta_sq"):
            raise ValueError(f"unknown weighting {weighting!r}; choose none or beta_sq")
        self.prediction = prediction
        self.weighting = weighting
        self.train_margin = float(train_margin)
        self.sample_margins: tuple[float, float] = sample_margins  # type: ignore[assignment]
        self.time_distribution = time_distribution or UniformTimes()

    def __repr__(self) -> str:
        return (
            f"Objective(prediction={self.prediction!r}, weighting={self.weighting!r}, "
            f"train_margin={self.train_margin}, sample_margins={self.sample_margins}, "
            f"time_distribution={self.time_distribution!r})"
        )

    def check_path(self, path) -> None:
        """Fail with one sentence if ``path`` cannot provide this objective's target."""
        if self.prediction not in path.parameterisations:
            raise ValueError(
                f"the {self.prediction} objective needs a Gaussian source; with a data-to-data path use objective=cfm"
            )

    def train_time_range(self, path, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
        """Times drawn for training: where the target is finite."""
        return path.time_range(targets=[self.prediction], margins=self.train_margin, dtype=dtype)

    def train_times(
        self,
        n: int,
        t_range: tuple[float, float],
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``(n,)`` training times: the time distribution's draws mapped onto ``t_range`` (``train_time_range``)."""
        lo, hi = t_range
        return lo + (hi - lo) * self.time_distribution.draw(n, generator, device, dtype)

    def sample_time_range(
        self, path, stochastic: bool = False, dtype: torch.dtype = torch.float32, fields: tuple[str, ...] | None = None
    ) -> tuple[float, float]:
        """Times a sampler integrates over: where the conversions of the prediction into the ``fields`` the sampler
        uses are finite (velocity; and the score for SDEs, ``stochastic``; a consistency sampler uses the data).

        Where this ends before t = 1 the sampler's last step is the data prediction (:meth:`to_data`).
        """
        fields = fields or (("velocity", "score") if stochastic else ("velocity",))
        return path.time_range([(self.prediction, f) for f in fields], margins=self.sample_margins, dtype=dtype)

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

    def to_data(self, path, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """``E[z | x_t]``, the denoiser, from the prediction (the sampler's last step)."""
        return path.convert(prediction, self.prediction, "data", x_t, t)
