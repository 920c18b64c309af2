"""Stages: what a run trains, and from what (``conf/stage/<name>.yaml``).

* :class:`TrainStage`: a model from data (the default);
* :class:`ReflowStage`: the 2-rectified flow of a teacher, trained on (noise, teacher sample) pairs;
* :class:`DistillStage`: a ``k``-step student of the teacher's ODE;
* :class:`ConsistencyStage`: consistency distillation, or consistency training without a teacher;
* :mod:`~flowdiff.stages.trajectories`: the teacher's ODE states that reflow and distillation train on, stored once.

``python train.py stage=reflow|distill|consistency teacher=<ckpt>``.
"""

from flowdiff.stages.base import Stage, Teacher, TrainStage
from flowdiff.stages.consistency import ConsistencyStage
from flowdiff.stages.distill import DistillStage
from flowdiff.stages.reflow import ReflowStage

__all__ = ["ConsistencyStage", "DistillStage", "ReflowStage", "Stage", "Teacher", "TrainStage"]
