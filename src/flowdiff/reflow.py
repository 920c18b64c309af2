"""Reflow (Liu et al. 2023, rectified flow; course: flow straightening): couple noise with a trained model's
samples of it, and train a new flow on that coupling.

A teacher's ODE maps each noise ``x0`` to a sample ``x1 = Phi(x0)``. Training a flow on the pairs
``(x0, Phi(x0))`` instead of independent ones gives the 2-rectified flow, whose paths are straighter (fewer steps
for the same samples); repeating it gives k-rectified flows. The pairs are drawn once with a configurable sampler
and stored (:func:`load_or_make_pairs`), and :class:`ReflowCoupling` keeps them as drawn in every batch.

``coupling=reflow coupling.teacher=<ckpt>`` in ``train.py``; see ``conf/coupling/reflow.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor

from flowdiff.couplings import Batch, Coupling

log = logging.getLogger("flowdiff")


class ReflowCoupling(Coupling):
    """The teacher's coupling: each batch already holds ``x0`` and the teacher's sample of it, kept as they are."""

    def __call__(self, x0: Tensor, z: Tensor, y: Tensor | None = None, generator=None) -> Batch:
        return x0, z, y

    def __repr__(self) -> str:
        return "ReflowCoupling()"


@torch.no_grad()
def make_pairs(teacher, n: int, sampler, batch_size: int = 5000, seed: int = 0) -> dict[str, Tensor]:
    """``{"x0", "x1", "y"}``: ``n`` noises drawn from ``seed`` and the teacher's samples of them (class-conditional
    with balanced labels for a CFG teacher, at its trained guidance scale)."""
    g = torch.Generator().manual_seed(seed)
    num_classes = teacher.guidance.null_label if teacher.guidance is not None else 0
    x0s, x1s, ys = [], [], []
    for i in range(0, n, batch_size):
        k = min(batch_size, n - i)
        x0 = teacher.draw_source(k, g)
        y = torch.arange(i, i + k) % num_classes if num_classes else None
        x1s.append(teacher.sample(k, sampler=sampler, y=y, x0=x0, generator=g).x.cpu())
        x0s.append(x0.cpu())
        ys.append(y if y is not None else torch.zeros(k, dtype=torch.long))
    return {"x0": torch.cat(x0s), "x1": torch.cat(x1s), "y": torch.cat(ys)}


def pairs_key(teacher_path: str | Path, sampler_cfg: dict, n: int, seed: int) -> str:
    """Names the stored pairs by what makes them: the teacher file (path, size, time), its sampler, n and seed."""
    path = Path(teacher_path).resolve()
    stat = path.stat()
    what = json.dumps([str(path), stat.st_size, stat.st_mtime_ns, sampler_cfg, n, seed], sort_keys=True, default=str)
    return hashlib.sha1(what.encode()).hexdigest()[:12]


def load_or_make_pairs(
    teacher_path: str | Path,
    teacher,
    sampler,
    sampler_cfg: dict,
    n: int,
    cache_dir: str | Path,
    batch_size: int = 5000,
    seed: int = 0,
) -> tuple[dict[str, Tensor], Path]:
    """The stored pairs for this teacher, sampler, ``n`` and ``seed`` (made and saved atomically on first use)."""
    cache = Path(cache_dir) / f"pairs-{pairs_key(teacher_path, sampler_cfg, n, seed)}.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=False)
        log.info("reflow: reusing %d pairs from %s (made in %.1f s)", n, cache, stored["meta"]["seconds"])
        return stored["pairs"], cache
    start = time.perf_counter()
    pairs = make_pairs(teacher, n, sampler, batch_size, seed)
    seconds = time.perf_counter() - start
    meta = {"teacher": str(teacher_path), "sampler": sampler_cfg, "n": n, "seed": seed, "seconds": seconds}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    torch.save({"pairs": pairs, "meta": meta}, tmp)
    tmp.replace(cache)
    size_mb = cache.stat().st_size / 2**20
    log.info("reflow: drew %d pairs with %r in %.1f s; stored at %s (%.1f MB)", n, sampler, seconds, cache, size_mb)
    print(f"reflow pairs: {n} drawn by the teacher in {seconds:.1f} s, stored at {cache} ({size_mb:.1f} MB)")
    return pairs, cache
