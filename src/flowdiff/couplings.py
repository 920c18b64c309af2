"""Couplings of source and data samples within a batch (independent, minibatch optimal transport).

Minibatch OT (Tong et al. 2024, "OT-CFM"; Pooladian et al. 2023) re-pairs the source
``x0`` with the data ``z`` of one batch along an optimal plan for the squared Euclidean
cost. With uniform weights and equal batch sizes POT's network simplex (``ot.emd``) returns a
vertex of the Birkhoff polytope, i.e. a permutation, which is used as it is (no draws, every
source point used once); otherwise pairs are drawn from POT's exact or Sinkhorn plan, as torchcfm does
(docs/BENCHMARKS.md compares the solvers' cost).

A coupling declares whether it keeps the noise independent of the data (``independent``): the score's formula
``-E[eps | x_t] / beta_t`` and the samplers that draw noise assume it, and the rules ask.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import ot
import torch
from torch import Tensor

from flowdiff.errors import check_choice, check_setting

Batch = tuple[Tensor, Tensor, Tensor | None]


class Coupling:
    """Re-pair a batch: ``(x0, z, y) -> (x0', z', y')``; labels stay with their data points."""

    #: whether the noise stays independent of the data (the product coupling keeps it so; a plan does not)
    independent: bool = False
    #: the stage whose own pairing this is (``stage=reflow``), or ``None`` for a ``coupling=`` choice
    made_by: str | None = None

    def __call__(
        self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Batch:  # pragma: no cover
        """``generator`` (CPU) drives any random draw; ``None``: torch's global RNG, which ``seed_everything`` seeds."""
        raise NotImplementedError


class IndependentCoupling(Coupling):
    """The product coupling ``q(x0) q(z)``: the batch as drawn."""

    independent = True

    def __call__(self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator=None) -> Batch:
        return x0, z, y

    def __repr__(self) -> str:
        return "IndependentCoupling()"


class MinibatchOTCoupling(Coupling):
    """Pair ``x0`` and ``z`` along the optimal transport plan of the batch.

    Args:
        method: ``"exact"`` (assignment / ``ot.emd``) or ``"sinkhorn"`` (``ot.sinkhorn`` with ``reg``).
        reg: entropic regularisation for Sinkhorn, relative to the batch's largest cost: flowdiff divides
            the cost by its maximum so that ``reg`` means the same at any data scale (torchcfm's
            ``OTPlanSampler`` does so only with ``normalize_cost=True``, which is not its default).
        by_label: pair only points of the same label (the source points are split at random
            among the labels in proportion to the data's label counts).
        global_batch: under ``torch.distributed`` (DDP), gather the batch from every rank, pair the global batch
            on rank 0 (with rank 0's generator) and give each rank its share of the pairs, so the plan is the
            one a single process would find on the concatenated batch (torchcfm's open issue #19). ``False``:
            each rank pairs its own batch (cheaper; the plan of a smaller batch). Batches must be equal in size.

    Draws (from non-permutation plans, and the label split) use torch's RNG, so ``seed_everything`` fixes
    them, and validation passes its own generator without moving the training stream. A plan that is not
    finite (Sinkhorn underflow at a tiny ``reg``) falls back to the independent pairing with a warning, as
    torchcfm does.
    """

    def __init__(
        self,
        method: Literal["exact", "sinkhorn"] = "exact",
        reg: float = 0.05,
        by_label: bool = False,
        global_batch: bool = False,
    ) -> None:
        check_choice("method", method, ("exact", "sinkhorn"))
        check_setting("reg", reg, lambda v: v > 0, "a positive regularisation, such as 0.05")
        self.method = method
        self.reg = reg
        self.by_label = by_label
        self.global_batch = global_batch

    def __repr__(self) -> str:
        return (
            f"MinibatchOTCoupling(method={self.method!r}, reg={self.reg}, by_label={self.by_label}, "
            f"global_batch={self.global_batch})"
        )

    def plan_indices(
        self, x0: Tensor, z: Tensor, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays ``(i, j)`` of length ``len(z)``: pair ``x0[i[k]]`` with ``z[j[k]]``."""
        cost = torch.cdist(x0.detach().flatten(1).double(), z.detach().flatten(1).double()).pow(2).cpu().numpy()
        n0, n1 = cost.shape
        a, b = np.full(n0, 1.0 / n0), np.full(n1, 1.0 / n1)
        if self.method == "exact":
            plan = ot.emd(a, b, cost, numItermax=1_000_000)
            if n0 == n1:
                rows = plan.argmax(0)
                if np.allclose(plan[rows, np.arange(n1)], 1.0 / n1):  # a permutation, as expected
                    return rows, np.arange(n1)
        else:
            plan = ot.sinkhorn(a, b, cost / max(cost.max(), 1e-12), reg=self.reg)
        if not np.isfinite(plan).all() or plan.sum() < 1e-8:
            warnings.warn(
                f"the {self.method} OT plan is not finite (reg={self.reg} too small?): this batch is paired "
                "independently",
                RuntimeWarning,
                stacklevel=2,
            )
            plan = np.outer(a, b)
        p = torch.as_tensor(plan.ravel() / plan.sum())
        flat = torch.multinomial(p, n1, replacement=True, generator=generator).numpy()
        return np.divmod(flat, n1)

    def pairs(
        self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays ``(i, j)``: the coupled batch is ``x0[i], z[j], y[j]`` (labels stay with their data)."""
        if not self.by_label or y is None:
            return self.plan_indices(x0, z, generator)
        if x0.shape[0] != z.shape[0]:
            raise ValueError("label-aware OT needs as many source as data points")
        labels = y.cpu().numpy()
        source_order = torch.randperm(x0.shape[0], generator=generator).numpy()
        i_parts, j_parts, start = [], [], 0
        for c in np.unique(labels):
            jz = np.flatnonzero(labels == c)
            i0 = source_order[start : start + len(jz)]
            start += len(jz)
            i, j = self.plan_indices(
                x0[torch.as_tensor(i0, device=x0.device)], z[torch.as_tensor(jz, device=z.device)], generator
            )
            i_parts.append(i0[i])
            j_parts.append(jz[j])
        return np.concatenate(i_parts), np.concatenate(j_parts)

    def __call__(self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator=None) -> Batch:
        if self.global_batch and _world_size() > 1:
            return self._global(x0, z, y, generator)
        i, j = self.pairs(x0, z, y, generator)
        i_t = torch.as_tensor(i, device=x0.device)
        j_t = torch.as_tensor(j, device=z.device)
        return x0[i_t], z[j_t], (None if y is None else y[j_t])

    def _global(self, x0: Tensor, z: Tensor, y: Tensor | None, generator) -> Batch:
        """Gather, pair on rank 0, broadcast the pairing, keep this rank's rows ``[rank b, (rank + 1) b)``."""
        import torch.distributed as dist

        world, rank, b = dist.get_world_size(), dist.get_rank(), z.shape[0]

        def gather(t: Tensor) -> Tensor:
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        x0_all, z_all = gather(x0), gather(z)
        y_all = None if y is None else gather(y)
        index = torch.empty(2, world * b, dtype=torch.long, device=z.device)
        if rank == 0:
            i, j = self.pairs(x0_all, z_all, y_all, generator)
            index.copy_(torch.as_tensor(np.stack([i, j]), device=z.device))
        dist.broadcast(index, src=0)
        i_t, j_t = index[:, rank * b : (rank + 1) * b]
        return x0_all[i_t], z_all[j_t], (None if y_all is None else y_all[j_t])


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def transport_cost(x0: Tensor, z: Tensor) -> float:
    """Mean squared distance of the pairs ``(x0[k], z[k])``."""
    return float((x0.double() - z.double()).flatten(1).pow(2).sum(1).mean())
