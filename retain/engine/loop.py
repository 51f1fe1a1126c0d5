"""The run: for every task, ``fit_task`` (the method's stages, one ``StageLoop`` each), ``evaluate`` every view on
the tasks seen so far, and a checkpoint of the method's state so ``resume=True`` continues after the last finished
task; inside a task, mid-task checkpoints (``checkpoint``) let it continue from the newest one."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from retain import distributed
from retain.config import RunConfig
from retain.data.scenarios import Scenario, Task
from retain.engine.build import (
    build_run,
    precision_used,
    resolve_device,
    retention_datasets,
    seed_everything,
    tf32_mode,
)
from retain.engine.checkpoint import Checkpointer, MidTask, clear_midtask, read_midtask, stop_on_interrupt
from retain.engine.compiling import enable_compile, watch_compilation
from retain.engine.context import NonFiniteLoss, RunContext, RunError, RunInterrupted
from retain.engine.evaluation import Evaluation, evaluate, primary_view
from retain.engine.retention import initial_retention
from retain.engine.rundir import INIT_FILE, SCENARIO_FILE, STATE_FILE, RunDir, RunState, metrics_record, state_sha256
from retain.engine.stages import StageLoop
from retain.methods.base import Method
from retain.models.adapters import mark_trainable

__all__ = ["run", "train", "fit_task"]


def fit_task(method: Method, task: Task, ctx: RunContext, saver: Checkpointer | None = None,
             resume: MidTask | None = None) -> tuple[float, int]:  # fmt: skip
    """Run the method's stages for ``task``; returns (seconds, parameters trained in any stage).

    ``saver`` writes mid-task checkpoints. ``resume`` continues from one: ``before_task`` runs again on the state
    the task started from, then the saved tensors replace the method's and the saved stage continues where it stood.
    """
    start = time.perf_counter() - (resume.task_seconds if resume is not None else 0.0)
    method.bind(ctx)
    method.model.set_seen(task.index + 1)
    method.before_task(task)
    stages = method.stages(task)
    first = 0 if resume is None else resume.stage
    if resume is not None:
        method.load_checkpoint_state({k: v.to(method.device) for k, v in resume.method.items()})
    if saver is not None:
        saver.task_start = start
    hooks = (saver.after_step, saver.after_epoch) if saver is not None else (None, None)
    for i, stage in enumerate(stages[first:], first):
        loop = StageLoop(method, task, stage, ctx, i)
        if resume is not None and i == first:
            loop.load_state_dict(resume.loop)
        loop.run(*hooks)
    n_trained = method.trained_names(task, stages)
    method.after_task(task)
    mark_trainable(method.model, [])
    params = dict(method.model.named_parameters())
    return time.perf_counter() - start, sum(params[n].numel() for n in n_trained)


def _open_writer(cfg: RunConfig, out: RunDir):
    if not cfg.train.tensorboard or not out.main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out.path / "tb"))


def run(cfg: RunConfig, resume: bool = False, log=print) -> dict:
    """Train ``cfg.method`` over the scenario, evaluating after each task; returns the metrics record.

    Writes ``runs/<name>/{config.yaml, scenario.json, init_sha256.json, metrics.json, run_state.json, checkpoints/,
    tb/}`` (and ``artefact.safetensors`` with ``run.export_each_task``). With ``resume``, continues from the newest
    complete checkpoint (mid-task, else after the last finished task). Launched by ``torchrun``
    (``retain.distributed``), every process runs this; rank 0 alone writes and logs.
    """
    return train(cfg, resume, log)[0]


def train(cfg: RunConfig, resume: bool = False, log=print) -> tuple[dict, Method]:
    """``run``, returning the metrics record and the trained method (as after its last task)."""
    with distributed.session(cfg.train.device), tf32_mode(cfg.train.tf32, cfg.train.device):
        try:
            return _run(cfg, resume, log if distributed.is_main() else _silent)
        except RuntimeError as e:
            if isinstance(e, RunError) or not (distributed.active() and distributed.peer_failure(e)):
                raise
            where = Path(cfg.out_dir) / cfg.name
            cause = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0])[:80]  # without gloo's source location
            raise RunError(f"another process of this run stopped ({cause}); {where} keeps the newest checkpoint: run "
                           "the same command with --resume") from None  # fmt: skip


def _silent(*args, **kwargs) -> None:
    """The log of a process other than rank 0."""


def _run(cfg: RunConfig, resume: bool, log) -> tuple[dict, Method]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    plan = distributed.batch_plan(cfg.train)  # a global batch the processes cannot split: refused before any write
    out = RunDir.open(cfg, resume)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    scenario, method = build_run(cfg, device)
    out.check_initial(state_sha256(method.model.state_dict()), resume)
    out.save_config(cfg)
    out.save_scenario(scenario)
    state = out.load_state(scenario.protocol)
    _check_processes(cfg, state, plan, log, resumed=resume and (out.path / STATE_FILE).exists())
    method.setup()
    if cfg.train.compile:
        enable_compile(method, log)
    if state.finished_tasks:
        _resume(method, scenario, state, out, log)
    found = read_midtask(out.path, log) if resume else None
    distributed.barrier()  # every process has read the run directory before rank 0 writes to it again
    mid = _midtask(out, state, found, log)
    ctx = RunContext(cfg.train, device, _open_writer(cfg, out), step=mid.step if mid else state.step, seed=cfg.seed)
    method.bind(ctx)
    retention = retention_datasets(cfg, scenario.tasks[0].test.base)
    if retention is not None and not state.retention:  # the pre-trained backbone's score comes first (cached)
        state.retention.append(initial_retention(cfg, method, retention, log))
    out.save_state(state)  # from now on the directory holds a run
    saver = Checkpointer(cfg, out.path, method, ctx)
    try:
        with stop_on_interrupt(saver), watch_compilation(log):
            for task in scenario.tasks[state.finished_tasks :]:
                _run_task(cfg, method, scenario, task, ctx, saver, mid, state, out, retention, log)
                mid = None
    except NonFiniteLoss as e:
        kept = f"the checkpoint at {saver.saved}" if saver.saved else f"{state.finished_tasks} finished task(s)"
        raise NonFiniteLoss(f"{e}; {out.path} keeps {kept}: lower train.lr or set train.grad_clip, then start a "
                            "new run with another name=...") from None  # fmt: skip
    finally:
        if ctx.writer is not None:
            ctx.writer.close()
    record = _metrics(cfg, scenario, state, device)
    out.write_metrics(record)
    return record, method


def _run_task(cfg: RunConfig, method: Method, scenario: Scenario, task: Task, ctx: RunContext, saver: Checkpointer,
              mid: MidTask | None, state: RunState, out: RunDir, retention, log) -> None:  # fmt: skip
    """Fit, evaluate and save one task (continuing ``mid`` when given); a pending stop request ends the run here."""
    r = cfg.data.retention
    seed_everything(cfg.seed + task.index)
    seconds, n_trained = fit_task(method, task, ctx, saver, mid)
    ev = evaluate(method, scenario, task.index, ctx, retention, r.k, r.temperature)
    state.record_task(ev, seconds, n_trained, method.bytes_per_task(task), method.task_record(task))
    state.step = ctx.step
    if cfg.checkpoint:
        state.checkpoint = out.save_checkpoint(method.checkpoint_state(), task.index, method.name)
    if cfg.run.export_each_task and out.main:
        _export(cfg, method, out, task.index + 1)
    out.save_state(state)
    clear_midtask(out.path)
    out.write_metrics(_metrics(cfg, scenario, state, ctx.device))
    _log_task(ctx, task, ev, seconds, cfg.name, scenario.n_tasks, log)
    if saver.stop_agreed():
        raise RunInterrupted(f"stopped after task {task.index + 1}/{scenario.n_tasks}, which is saved in {out.path}")


def _metrics(cfg: RunConfig, scenario: Scenario, state: RunState, device: torch.device) -> dict:
    """``metrics_record`` and the precision the run computes in (``precision``: autocast, TF32)."""
    record = metrics_record(cfg, scenario.class_order, scenario.n_tasks, state)
    return record | {"precision": precision_used(cfg.train, device)}


def _export(cfg: RunConfig, method: Method, out: RunDir, n: int) -> None:
    """``run.export_each_task``: the artefact of the tasks finished so far, as ``retain export`` writes it."""
    from retain.artefact import ARTEFACT_FILE, write_artefact  # (the artefact module builds on the engine)

    info, initial = (json.loads((out.path / name).read_text()) for name in (SCENARIO_FILE, INIT_FILE))
    write_artefact(method, cfg, info, n, initial, out.path / ARTEFACT_FILE)


def _log_task(ctx: RunContext, task: Task, ev: Evaluation, seconds: float, name: str, n_tasks: int, log) -> None:
    main = primary_view(ev.protocol)
    if ctx.writer is not None:  # the primary view under acc/, the others under acc_<view>/
        for view, values in ev.accuracy.items():
            prefix = "acc" if view == main else f"acc_{view}"
            for i, a in enumerate(values):
                ctx.writer.add_scalar(f"{prefix}/task_{i}", a, task.index)
            ctx.writer.add_scalar(f"{prefix}/average", sum(values) / len(values), task.index)
    accs = ev.primary
    others = "".join(f" | {v} {sum(a) / len(a):.1f}" for v, a in ev.accuracy.items() if v != main)
    log(f"[{name}] task {task.index + 1}/{n_tasks}: acc " + " ".join(f"{a:.1f}" for a in accs) + others
        + (f" | task-id {ev.task_id:.1f}" if ev.task_id is not None else "") + f" | {seconds:.1f}s")  # fmt: skip


def _resume(method: Method, scenario: Scenario, state: RunState, out: RunDir, log) -> None:
    done = state.finished_tasks
    if state.checkpoint is None:
        raise RunError(f"--resume: {out.path} has finished tasks but no checkpoint (checkpoint=false was set); "
                       "start a new run with another name=...")  # fmt: skip
    fill = method.model.state_dict() | method.checkpoint_state()  # what the checkpoint left out, as rebuilt
    method.load_checkpoint_state(out.load_checkpoint(state.checkpoint, method.device, fill))
    method.model.set_seen(done)
    method.resume(scenario.tasks[done - 1])
    log(f"[resume] {done} finished task(s) loaded from {out.path / state.checkpoint}")


def _midtask(out: RunDir, state: RunState, mid: MidTask | None, log) -> MidTask | None:
    """``mid`` (the mid-task checkpoint read) if it belongs to the task after the finished ones; an older one is
    dropped."""
    if mid is not None and mid.task != state.finished_tasks:  # its task finished after it was written
        clear_midtask(out.path)
        return None
    if mid is not None:
        log(f"[resume] continuing from the checkpoint at {mid.where}")
    return mid


def _check_processes(cfg: RunConfig, state: RunState, plan: dict, log, resumed: bool) -> None:
    """Record the number of processes; a run resumed on another number continues only where the maths is the same
    (``train.batch_scope=global``: the global batch and lr do not depend on it)."""
    n, before = plan["processes"], state.processes
    if resumed and n != before:
        if cfg.train.batch_scope == "per_process":
            raise RunError(f"--resume on {n} process(es): this run ran on {before} with train.batch_scope="
                           f"per_process, so its global batch would change; resume on {before}")  # fmt: skip
        log(f"[resume] on {n} process(es) (before: {before}); the global batch stays {plan['global_batch']}")
    state.processes = n
    if n > 1:
        log(f"[distributed] {n} processes: global batch {plan['global_batch']} ({plan['per_process_batch']} per "
            f"process), lr x{plan['lr_factor']} (train.batch_scope={plan['batch_scope']}, "
            f"train.lr_scaling={plan['lr_scaling']})")  # fmt: skip
