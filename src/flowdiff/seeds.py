"""Named random streams and the one per-rank rule.

* :func:`stream_seed` names a stream by its keys (``("images", seed, index)``): counter-based, so any member can be
  drawn again without the ones before it, and distinct names give unrelated seeds.
* :data:`OFFSETS` names the fixed seeds of the evaluation draws (the 2D validation and test sets, the samples of
  a validation round, the NFE profile, the plotted trajectories, the grids, the FID samples); the values are
  those flowdiff always used, so every documented number stays what it was.
* :func:`rank_seed` is the one rule for a DDP rank's own stream.
* :class:`RandomStreams` keeps the training stream (noise, times, couplings, label drops) in checkpoints, so a
  resumed run draws what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

#: the fixed seeds of the evaluation draws, by name (added to the run's seed where a draw follows it)
OFFSETS = {
    "val set": 1_000_003,
    "test set": 2_000_003,
    "data moments": 3_000_003,
    "validation samples": 1234,
    "nfe profile": 4321,
    "plotted trajectories": 99,
    "grid": 7,
    "fid samples": 1234,
}

RANK_STRIDE = 7919  # a prime: rank r's stream starts 7919 r seeds away from rank 0's


def stream_seed(*keys: object) -> int:
    """A 63-bit seed for the named stream ``keys`` (e.g. ``("images", seed, index)``)."""
    digest = hashlib.blake2b("/".join(["flowdiff", *map(str, keys)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of DDP rank ``rank``'s own stream, from the seed every rank shares."""
    return seed + RANK_STRIDE * rank


class RandomStreams:
    """The global training stream across DDP ranks and checkpoints."""

    @staticmethod
    def seed_rank(trainer) -> None:
        """Independent noise and times on every DDP rank (rank 0 keeps the run's stream)."""
        if trainer.world_size > 1:
            torch.manual_seed(rank_seed(torch.initial_seed(), trainer.global_rank))

    @staticmethod
    def state() -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    @staticmethod
    def restore(states: dict[str, Any] | None, trainer) -> None:
        """Continue the stream of a checkpoint, in a resumed fit only (rank 0's; other ranks derive their own)."""
        if states is None or trainer is None or trainer.state.fn != "fit":
            return
        torch.set_rng_state(states["torch"])
        if torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states["cuda"])
        if trainer.world_size > 1:
            torch.manual_seed(rank_seed(int(torch.randint(2**62, (1,))), trainer.global_rank))
