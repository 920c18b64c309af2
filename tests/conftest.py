import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: each keeps to its share
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # the train.py / sample.py subprocesses too
    torch.set_num_threads(_threads)

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
