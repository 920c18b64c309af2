"""Reflow (Liu et al. 2023, rectified flow; course: flow straightening): couple noise with a trained model's
samples of it, and train a new flow on that coupling.

A teacher's ODE maps each noise ``x0`` to a sample ``x1 = Phi(x0)``. Training a flow on the pairs
``(x0, Phi(x0))`` instead of independent ones gives the 2-rectified flow, whose paths are straighter (fewer steps
for the same samples); repeating it gives k-rectified flows. The pairs are drawn once with a configurable sampler
and stored (:func:`flowdiff.stages.trajectories.load_or_make_trajectories`), and :class:`ReflowCoupling` keeps them
as drawn in every batch.

``python train.py stage=reflow teacher=<ckpt>`` (``coupling=reflow``); see ``conf/coupling/reflow.yaml``.
"""

from __future__ import annotations

from torch import Tensor

from flowdiff.couplings import Batch, Coupling


class ReflowCoupling(Coupling):
    """The teacher's coupling: each batch already holds ``x0`` and the teacher's sample of it, kept as they are."""

    def __call__(self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator=None) -> Batch:
        return x0, z, y

    def __repr__(self) -> str:
        return "ReflowCoupling()"
