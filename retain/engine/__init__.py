"""The engine: the only training loop. ``run(cfg)`` builds everything (``build``), then per task fits the method's
stages (``stages.StageLoop``: optimiser, ``schedules``, budget, validation, position), evaluates every accuracy
view (``evaluation``) and writes the run directory (``rundir``; mid-task checkpoints: ``checkpoint``); ``loop``
reads top to bottom."""

from retain.engine.build import build_datasets, build_method, build_model, build_run, resolve_device, seed_everything
from retain.engine.checkpoint import Checkpointer, MidTask, read_midtask
from retain.engine.context import NonFiniteLoss, RunContext, RunError, RunInterrupted
from retain.engine.evaluation import VIEWS, Evaluation, evaluate, primary_view, retention_accuracy
from retain.engine.loop import fit_task, run, train
from retain.engine.rundir import RunDir, RunState, metrics_record
from retain.engine.schedules import Schedule, build_schedule
from retain.engine.stages import Position, StageLoop, build_optimizer, fit_stage

__all__ = ["run", "train", "fit_task", "fit_stage", "evaluate", "build_run", "build_model", "build_method",
           "build_datasets", "build_optimizer", "build_schedule", "seed_everything", "resolve_device", "RunContext",
           "RunError", "RunInterrupted", "NonFiniteLoss", "Checkpointer", "MidTask", "read_midtask", "RunDir",
           "RunState", "metrics_record", "StageLoop", "Position", "Schedule", "Evaluation", "VIEWS", "primary_view",
           "retention_accuracy"]  # fmt: skip
