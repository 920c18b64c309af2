"""Progress on long work: the training bar counts steps of max_steps; evaluations in a log print their ETA."""

import lightning as L
import pytest
import torch

from flowdiff.callbacks import StepProgressBar
from flowdiff.progress import progress


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("terminal", [True, False])
def test_training_bar_counts_steps_of_max_steps(tmp_path, capsys, terminal):
    """Seven steps over epochs of three batches: one bar from 0 to 7 (Lightning's own reads 'Epoch 2/-2', a bar of
    3 batches per epoch, as max_epochs is -1 in a step-based run). An evaluation shows as a line of that bar in a
    terminal, and as printed lines in a log (where rich draws the bar only when it stops)."""
    import rich

    seen = {}

    class Evaluates(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            with progress("evaluation", 4, trainer) as advance:
                task = max(trainer.progress_bar_callback.progress.tasks, key=lambda t: t.id)
                seen["last task"] = (task.description, task.total)
                advance(4)

    bar = StepProgressBar(console_kwargs={"force_terminal": terminal, "force_interactive": terminal})
    trainer = L.Trainer(
        max_steps=7, callbacks=[bar, Evaluates()], logger=False, enable_checkpointing=False, default_root_dir=tmp_path
    )
    try:
        trainer.fit(_Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(3, 1), batch_size=1))
    finally:
        rich.reconfigure()
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (7, 7) and task.description.strip() == "Step (epoch 2)"
    printed = capsys.readouterr().out
    if terminal:
        assert seen["last task"] == ("evaluation", 4) and "evaluation: 0/4" not in printed
    else:
        assert seen["last task"][0].startswith("Step (epoch") and "evaluation: 0/4 ..." in printed
        assert "training: 0/7 steps ..." in printed and "training: 7/7 steps in 0:00:0" in printed


def test_progress_in_a_log_prints_count_and_time_left(capsys):
    with progress("features", 10, every_s=0, unit="images") as advance:
        for _ in range(5):
            advance(2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "features: 0/10 images ..."
    assert lines[1].startswith("features: 2/10 images, 0:00:00 elapsed, about 0:00:0") and lines[1].endswith(" left")
    assert lines[-1].startswith("features: 10/10 images in 0:00:0")


def test_disabled_progress_says_nothing(capsys):
    with progress("rank 1", 10, enabled=False) as advance:
        advance(10)
    assert capsys.readouterr().out == ""


def test_time_left_after_a_resume_counts_this_processs_pace(monkeypatch, capsys):
    """A run resumed at step 50 of 100 that did 10 steps in its first 10 s has 40 s left, not the 6.7 s that counting
    the 50 steps before the resume would give."""
    import flowdiff.progress as p

    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr(p.time, "perf_counter", lambda: next(clock))
    lines = p.LogLines("training", 100, every_s=5, unit="steps", done=50)
    lines.update(60)
    assert capsys.readouterr().out.splitlines() == [
        "training: 50/100 steps ...",
        "training: 60/100 steps, 0:00:10 elapsed, about 0:00:40 left",
    ]
