"""Named random streams and the one per-rank rule.

* :func:`stream_seed` names a stream by its keys (``("images", seed, index)``): counter-based, so any member can be
  drawn again without the ones before it, and distinct names give unrelated seeds.
* :data:`OFFSETS` names the fixed seeds of the evaluation draws (the 2D validation and test sets, the samples of
  a validation round, the NFE profile, the plotted trajectories, the grids, the FID samples) and :func:`seeded`
  gives a generator for one of them; the values are those flowdiff always used, so every documented number stays
  what it was.
* :func:`rank_seed` is the one rule for a DDP rank's own stream.
* :class:`RandomStreams` keeps the training stream (noise, times, couplings, label drops) in checkpoints, so a
  resumed run draws what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

#: the fixed seeds of the evaluation draws, by name (added to the run's or the data's seed where a draw follows it)
OFFSETS = {
    "val set": 1_000_003,  # the 2D toys' validation and test sets and moments, from the data's seed
    "test set": 2_000_003,
    "data moments": 3_000_003,
    "validation loss": 0,  # + the batch index: the same noise and times every validation round
    "validation samples": 1234,  # the starting points of a validation round's samples
    "validation noise": 1235,  # their SDE noise (one stream per rank)
    "nfe profile": 4321,
    "plotted trajectories": 99,
    "grid": 7,
    "fid samples": 1234,
    "loader workers": 1,  # image datasets, from the data's seed: the DataLoader's worker seeds
    "real train images": 0,  # the fixed random orders real_images() reads the splits in
    "real val images": 1,
}

RANK_STRIDE = 7919  # a prime: rank r's stream starts 7919 r seeds away from rank 0's


def stream_seed(*keys: object) -> int:
    """A 63-bit seed for the named stream ``keys`` (e.g. ``("images", seed, index)``)."""
    digest = hashlib.blake2b("/".join(["flowdiff", *map(str, keys)]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded(name: str, seed: int = 0, device: torch.device | str | None = None) -> torch.Generator:
    """A generator (on ``device``, CPU by default) for the named draw ``name`` of :data:`OFFSETS`, after ``seed``."""
    return torch.Generator(device=device or "cpu").manual_seed(OFFSETS[name] + int(seed))


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
