"""The one rule for when an evaluation callback acts."""

from __future__ import annotations

import lightning as L

from flowdiff.errors import check_setting


class EveryNEpochs(L.Callback):
    """A callback that acts at every ``every_n_epochs``-th validation round (never in Lightning's sanity check) and
    whenever ``trainer.validate`` runs; ``data_kinds`` says which data it serves (``vector``, ``image``)."""

    data_kinds: tuple[str, ...] = ()

    def __init__(self, every_n_epochs: int = 1) -> None:
        check_setting("every_n_epochs", every_n_epochs, lambda v: v >= 1, "at least 1", whole=True)
        self.every_n_epochs = int(every_n_epochs)

    def due(self, trainer: L.Trainer) -> bool:
        if trainer.state.fn == "validate":
            return True
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
