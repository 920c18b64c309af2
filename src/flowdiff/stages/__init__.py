"""Few-step stages: a trained model (the teacher, a checkpoint) in, a new model out.

* :mod:`~flowdiff.stages.reflow`: the 2-rectified flow, trained on (noise, teacher sample) pairs (a coupling);
* :mod:`~flowdiff.stages.distill`: a ``k``-step student of the teacher's ODE;
* :mod:`~flowdiff.stages.consistency`: consistency distillation and consistency training;
* :mod:`~flowdiff.stages.trajectories`: the teacher's ODE states that reflow and distillation train on, stored once.

``python train.py stage=reflow|distill|consistency teacher=<ckpt>``; the glue (loading the teacher, checking it
fits the run) is in :mod:`flowdiff.cli.build`.
"""
