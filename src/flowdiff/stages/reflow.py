"""Reflow (Liu et al. 2023, rectified flow; course: flow straightening): couple noise with a trained model's
samples of it, and train a new flow on that coupling.

A teacher's ODE maps each noise ``x0`` to a sample ``x1 = Phi(x0)``. Training a flow on the pairs
``(x0, Phi(x0))`` instead of independent ones gives the 2-rectified flow, whose paths are straighter (fewer steps
for the same samples); repeating it gives k-rectified flows. The pairs are drawn once with the stage's sampler and
stored (:func:`flowdiff.stages.trajectories.load_or_make_trajectories`), and :class:`ReflowCoupling` keeps them as
drawn in every batch.

``python train.py stage=reflow teacher=<ckpt>``; see ``conf/stage/reflow.yaml``.
"""

from __future__ import annotations

from torch import Tensor

from flowdiff.couplings import Batch, Coupling
from flowdiff.errors import ConfigError
from flowdiff.samplers import Dopri5Sampler, Sampler
from flowdiff.stages.base import Stage
from flowdiff.stages.trajectories import TeacherTrajectories


class ReflowCoupling(Coupling):
    """The teacher's coupling: each batch already holds ``x0`` and the teacher's sample of it, kept as they are."""

    independent = False
    made_by = "stage=reflow"  # not a coupling= choice

    def __call__(self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator=None) -> Batch:
        return x0, z, y

    def __repr__(self) -> str:
        return "ReflowCoupling()"


class ReflowStage(TeacherTrajectories, Stage):
    """The 2-rectified flow of ``teacher`` (run it again on the student's checkpoint for a 3-rectified flow).

    Args:
        teacher: the trained model's checkpoint.
        n_pairs: (noise, sample) pairs, drawn once and stored under ``cache_dir``.
        sampler: how the teacher maps noise to samples (dopri5 by default; one that needs the path is built with
            the teacher's).
        batch_size: pairs per teacher call.
        init_from_teacher: start from the teacher's weights, as Liu et al. do.
    """

    name = "reflow"
    needs_teacher = True
    conditions_on_context = True  # its pairs hold the teacher's contexts, which FlowModel.loss reads

    def __init__(
        self,
        teacher: str | None = None,
        n_pairs: int = 20000,
        sampler: Sampler | None = None,
        batch_size: int = 5000,
        init_from_teacher: bool = True,
        cache_dir: str = "reflow_pairs",
    ) -> None:
        Stage.__init__(self, teacher, init_from_teacher)
        TeacherTrajectories.__init__(self, n_pairs, sampler or Dopri5Sampler(), batch_size, cache_dir)

    def trajectory_steps(self) -> int:
        return 1  # (x0, x1) only

    def coupling(self, coupling) -> Coupling:
        return ReflowCoupling()

    def check(self, datamodule, model, coupling) -> None:
        super().check(datamodule, model, coupling)
        if model.objective.prediction in ("score", "noise"):
            raise ConfigError(
                f"stage=reflow pairs each noise with the teacher's sample of it, so the noise is not independent of "
                f"the data and a {model.objective.prediction} objective has no meaning: use objective=cfm or "
                "objective=data"
            )
