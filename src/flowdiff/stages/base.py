"""A stage is what a run trains, and from what: :class:`TrainStage` trains a model from data; the few-step stages
(:class:`~flowdiff.stages.reflow.ReflowStage`, :class:`~flowdiff.stages.distill.DistillStage`,
:class:`~flowdiff.stages.consistency.ConsistencyStage`) start from a trained model, its checkpoint the teacher.

``conf/stage/<name>.yaml`` builds one (``stage=distill teacher=<ckpt>``). A stage loads its teacher once, takes the
teacher's data, network, path and guidance unless the command line names them, says what its datamodule and
LightningModule are, states its rules (each one sentence naming the fix) and gives the student its start.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from omegaconf import DictConfig, OmegaConf, open_dict

from flowdiff.checkpointing import check_weights_fit
from flowdiff.errors import ConfigError
from flowdiff.model import FlowModel
from flowdiff.module import FlowModule

#: what a student takes from its teacher's checkpoint unless the command line names it
INHERITED = ("data", "net", "path", "guidance")


class Teacher(NamedTuple):
    """The trained model a stage starts from: its checkpoint ``path``, the ``model``, its data and config."""

    path: str
    model: FlowModel
    datamodule: Any
    cfg: DictConfig


class Stage:
    """What a run trains. Subclasses set ``name`` (for messages), ``module_class`` and what they change.

    Args:
        teacher: a checkpoint written by ``train.py`` (``teacher=<ckpt>``), or ``None``.
        init_from_teacher: start the student from the teacher's weights.
    """

    name = "train"
    module_class: type[FlowModule] = FlowModule
    #: a student samples a CFG teacher's guidance at this w (its teacher's guidance is in what it learns)
    student_guidance_scale: float | None = None
    #: whether the stage starts from a trained model (reflow, distillation) or may start from data
    needs_teacher: bool = False

    def __init__(self, teacher: str | None = None, init_from_teacher: bool = True) -> None:
        self.teacher_path = None if teacher is None else str(teacher)
        if self.needs_teacher and self.teacher_path is None:
            raise ConfigError(f"stage={self.name} needs teacher=<a checkpoint written by train.py>")
        self.init_from_teacher = init_from_teacher
        self._teacher: Teacher | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(teacher={self.teacher_path})"

    @property
    def teacher(self) -> Teacher | None:
        """The teacher, loaded on first use (one sentence for a missing or foreign file)."""
        if self.teacher_path is not None and self._teacher is None:
            from flowdiff.build import load_checkpoint  # a teacher is a checkpoint like any other

            try:
                model, datamodule, cfg = load_checkpoint(self.teacher_path)
            except ConfigError as err:
                raise ConfigError(f"teacher: {err}") from None
            self._teacher = Teacher(self.teacher_path, model, datamodule, cfg)
        return self._teacher

    # ------------------------------------------------------------------ the run's config
    def configure(self, cfg: DictConfig, named: set[str]) -> None:
        """Take the teacher's data, net, path and guidance (``INHERITED``) where the command line names none of a
        group's keys (``named``: the keys it sets, such as ``data`` or ``data.batch_size``; a named key is kept on
        top of the teacher's group); set the student's guidance scale."""
        teacher = self.teacher
        with open_dict(cfg):
            for group in INHERITED if teacher is not None else ():
                if group in named or group not in teacher.cfg:
                    continue
                node = OmegaConf.create(OmegaConf.to_container(teacher.cfg[group]))
                for key in sorted(k for k in named if k.startswith(group + ".")):
                    OmegaConf.update(node, key[len(group) + 1 :], OmegaConf.select(cfg, key), force_add=True)
                cfg[group] = node
            if self.student_guidance_scale is not None and "_target_" in cfg.guidance and "guidance.scale" not in named:
                cfg.guidance.scale = self.student_guidance_scale

    # ------------------------------------------------------------------ what the stage builds
    def datamodule(self, datamodule):
        """The run's datamodule (the data itself, unless the stage trains on something else); a policy's in its
        teacher's units (the teacher's normalisation of observations and actions)."""
        theirs = getattr(getattr(self.teacher, "datamodule", None), "normaliser", None)
        if theirs is not None and hasattr(datamodule, "normalise"):
            datamodule.normaliser.load_state_dict(theirs.state_dict())
            datamodule.normalise()
        return datamodule

    def coupling(self, coupling):
        """The coupling of the run's batches (the configured one, unless the stage pairs them itself)."""
        return coupling

    def module_kwargs(self) -> dict[str, Any]:
        """What ``module_class`` takes besides the model, coupling, optimiser, scheduler and NaN policy."""
        return {}

    # ------------------------------------------------------------------ rules and the start
    #: whether the stage passes a batch's context (policies' observations) to its networks
    conditions_on_context = False

    def check(self, datamodule, model: FlowModel, coupling) -> None:
        """A teacher must have been trained on this run's data, with labels exactly when this run has them; a stage
        that does not pass contexts on refuses policy data rather than train an unconditional student."""
        if getattr(datamodule, "context_dim", 0) and not self.conditions_on_context:
            raise ConfigError(
                f"stage={self.name} does not pass a batch's context (data={datamodule.name}'s observations) to its "
                "networks yet: train policies with stage=train"
            )
        teacher = self.teacher
        if teacher is None:
            return

        def identity(dm) -> tuple:  # a policy's tasks too: the same shapes, another task's observations
            tasks = getattr(dm, "tasks", None)
            return (dm.name, tuple(dm.data_shape), *([f"tasks {tasks}"] if tasks else []))

        ours, theirs = identity(datamodule), identity(teacher.datamodule)
        if ours != theirs:
            raise ConfigError(
                f"stage={self.name}: the teacher was trained on data={theirs[0]} {' '.join(map(str, theirs[1:]))}, "
                f"this run is on data={ours[0]} {' '.join(map(str, ours[1:]))}: use the teacher's data (leave data "
                "unset: the stage takes it)"
            )
        guided, teacher_guided = model.guidance is not None, teacher.model.guidance is not None
        if guided != teacher_guided:
            which = "cfg" if teacher_guided else "none"
            raise ConfigError(
                f"stage={self.name}: the teacher was trained with guidance={which}, this run with "
                f"guidance={'cfg' if guided else 'none'}: use the teacher's"
            )

    def initialise(self, module: FlowModule) -> None:
        """Start the student from the teacher's weights (its EMA average, when it had one), if asked."""
        teacher = self.teacher
        if teacher is None or not self.init_from_teacher:
            return
        weights = teacher.model.net.state_dict()
        check_weights_fit(module.net, {"state_dict": weights}, teacher.path, "teacher")  # the same net.* settings
        if module.objective.prediction != teacher.model.objective.prediction:
            raise ConfigError(
                f"stage={self.name}: the teacher predicts {teacher.model.objective.prediction}, this run "
                f"{module.objective.prediction}, so its weights are no start: use the teacher's objective, or "
                "stage.init_from_teacher=false"
            )
        module.net.load_state_dict(weights)


class TrainStage(Stage):
    """Train a model from data (``stage=train``, the default); it takes no teacher."""

    conditions_on_context = True  # FlowModel.loss reads the batch's context

    def __init__(self, teacher: str | None = None) -> None:
        if teacher is not None:
            raise ConfigError(
                f"teacher={teacher} is set but stage=train does not use one: add stage=reflow, stage=distill or "
                "stage=consistency, or drop teacher"
            )
        super().__init__(None, init_from_teacher=False)
