import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

from flowdiff.paths import CondOTSchedule, CosineSchedule, LinearVPSchedule, PolynomialSchedule, SqrtSchedule  # noqa: E402

ALL_SCHEDULES = {
    "condot": CondOTSchedule(),
    "cosine": CosineSchedule(),
    "linear_vp": LinearVPSchedule(),
    "polynomial": PolynomialSchedule(2.0),
    "sqrt": SqrtSchedule(),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
