"""A sweep's runs in their own processes: ``retain sweep ... --jobs N`` on this machine, ``--launcher local|slurm``
through submitit (one job per run, a Slurm array).

Each run is the command :func:`run_command` builds, ``python -m retain run PRESET <the command's overrides, the
swept keys at the run's values> name=RUN out_dir=SWEEP`` (the config :func:`retain.sweep.plan_sweep` validated,
key for key), ``--resume`` for a started run, and the launcher's own overrides last (``train.threads`` on a CPU,
when the command does not set it). Several GPUs per run: ``python -m torch.distributed.run --standalone
--nproc_per_node K -m retain run ...`` (a free rendezvous port per run). A run's output goes to
``SWEEP/.logs/RUN.log``; the index (``sweep.json``) is updated as runs start and end, as the sequential sweep does.

Stopping: Ctrl-C sends each running run one SIGINT (it saves a mid-task checkpoint and stops, as ``retain run``
does), waits up to :data:`STOP_WAIT_S` seconds, and marks it ``interrupted``; the same command resumes it. A job
that a cluster preempts or times out is given the same SIGINT by its ``checkpoint()`` and requeued; a job that is
killed outright resumes from its newest checkpoint when the sweep command is run again (or requeued): a job always
resumes a started run. No torch is imported here but to count GPUs.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from retain.config import ConfigError
from retain.runindex import SweepRun
from retain.sweep import Sweep, run_status, write_index

__all__ = ["LAUNCHERS", "STOP_WAIT_S", "LOG_DIR", "JOB_DIR", "Resources", "run_command", "plan_resources",
           "run_parallel", "RunJob", "submit_sweep", "job_state", "status_lines", "log_path"]  # fmt: skip

LAUNCHERS = ("local", "slurm")
STOP_WAIT_S = 60.0  # seconds a stopped run has to save its checkpoint before it is killed (Slurm warns 90 s ahead)
LOG_DIR = ".logs"  # SWEEP/.logs/RUN.log: a run's stdout and stderr
JOB_DIR = ".submitit"  # submitit's pickles and job logs
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
           "REQUEUE_FED"}  # fmt: skip
_POLL_S = 0.5


@dataclasses.dataclass
class Resources:
    """What each run gets: ``gpu_groups`` (CUDA_VISIBLE_DEVICES of each concurrent slot; empty on a CPU), the
    processes per run (torchrun when > 1) and the overrides the launcher appends (``train.threads=K``)."""

    jobs: int
    gpu_groups: list[str]
    nproc: int = 1
    extra: list[str] = dataclasses.field(default_factory=list)


def log_path(sweep: Sweep, name: str) -> Path:
    return sweep.path / LOG_DIR / f"{name}.log"


def run_command(sweep: Sweep, name: str, resume: bool = False, extra: Sequence[str] = (), nproc: int = 1) -> list[str]:
    """The argv that runs ``name`` of ``sweep`` in its own process: the config of ``sweep.configs[name]`` (the
    launcher's ``extra`` overrides appended last)."""
    if sweep.preset is None:
        raise ConfigError("a sweep without a preset runs in this process only (no --jobs, no --launcher)")
    head = [sys.executable, "-m", "retain"]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                "retain"]  # fmt: skip
    return [*head, "run", sweep.preset, *sweep.overrides[name], *extra, *(["--resume"] if resume else [])]


def _given(sweep: Sweep, key: str) -> bool:
    """Whether the command sets ``key`` (fixed or swept)."""
    return key in sweep.grid or any(o.split("=", 1)[0] == key for o in sweep.fixed)


def visible_gpus() -> list[str]:
    """The GPU ids a child may be given in CUDA_VISIBLE_DEVICES: this process's visible ones."""
    import torch

    n = torch.cuda.device_count()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else [str(i) for i in range(n)]
    return ids[:n]


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _on_gpu(sweep: Sweep, have_gpus: bool) -> bool:
    devices = {c.train.device for c in sweep.configs.values()}
    return have_gpus and bool(devices - {"cpu"})


def plan_resources(sweep: Sweep, jobs: int, gpus_per_run: int | None, gpus: list[str] | None = None) -> Resources:
    """Devices of ``jobs`` concurrent runs on this machine: ``gpus_per_run`` GPUs each (default 1) when the runs use
    a GPU (``train.device`` auto or cuda, and one is visible), else a CPU's cores divided (``train.threads``, unless
    the command sets it). ConfigError (one line) when the GPUs do not suffice."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    if gpus_per_run is not None and gpus_per_run < 1:
        raise ConfigError(f"--gpus-per-run {gpus_per_run}: give at least 1 (on a CPU, leave it out)")
    gpus = visible_gpus() if gpus is None else gpus
    if not _on_gpu(sweep, bool(gpus)):
        if gpus_per_run is not None:
            why = "the runs have train.device=cpu" if gpus else "no GPU is visible (CUDA_VISIBLE_DEVICES, drivers)"
            raise ConfigError(f"--gpus-per-run {gpus_per_run}: {why}; leave it out to run on the CPU")
        extra = [] if _given(sweep, "train.threads") or jobs == 1 else [f"train.threads={max(1, _cpus() // jobs)}"]
        return Resources(jobs, [], 1, extra)
    k = gpus_per_run or 1
    if jobs * k > len(gpus):
        raise ConfigError(f"--jobs {jobs} x --gpus-per-run {k} needs {jobs * k} GPUs; {len(gpus)} visible "
                          f"({','.join(gpus)}): use --jobs {max(1, len(gpus) // k)}")  # fmt: skip
    return Resources(jobs, [",".join(gpus[i * k : (i + 1) * k]) for i in range(jobs)], k, [])


def _error_line(path: Path, code: int) -> str:
    """A failed run's error: its last ``retain: error:`` line, else its last line, else its exit code."""
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln[len("retain: error: ") :] for ln in lines if ln.startswith("retain: error: ")]
    if errors:
        return errors[-1]
    if code < 0:
        try:
            return f"the run was stopped by {signal.Signals(-code).name}"
        except ValueError:
            return f"the run was stopped by signal {-code}"
    lines = [ln for ln in lines if not ln.startswith("[retain sweep]")]
    return lines[-1] if lines else f"exit code {code}"


def _header(log: Any, argv: Sequence[str], pid: int, env: dict[str, str] | None = None) -> None:
    gpus = f" CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if env and "CUDA_VISIBLE_DEVICES" in env else ""
    log.write(f"[retain sweep] pid {pid}{gpus}: {shlex.join(argv)}\n")
    log.flush()


# ----------------------------------------------------------------------------------------------- --jobs N


def run_parallel(sweep: Sweep, res: Resources, log: Callable[[str], Any] = print) -> list[SweepRun]:
    """Runs the command's runs ``res.jobs`` at a time, each in its own process; returns those that failed.

    As :func:`retain.sweep.run_sweep`: a finished run is skipped, a started one resumed, a failed one marked
    ``failed`` (its error line in the index) while the others go on. Ctrl-C: no new run starts, each running one
    gets SIGINT (it saves a checkpoint and stops; killed after STOP_WAIT_S), is marked ``interrupted``, and
    KeyboardInterrupt propagates with the index written.
    """
    todo = [r for r in sweep.runs if r.name in sweep.configs]
    lock, stop = threading.Lock(), threading.Event()
    slots: queue.Queue[str | None] = queue.Queue()
    for group in res.gpu_groups or [None] * res.jobs:
        slots.put(group)
    procs: dict[str, subprocess.Popen] = {}
    failed: list[SweepRun] = []
    (sweep.path / LOG_DIR).mkdir(parents=True, exist_ok=True)

    def one(i: int, entry: SweepRun) -> None:
        group = slots.get()
        try:
            if stop.is_set():
                return
            run_dir = sweep.path / entry.name
            resume = run_status(run_dir) == "interrupted"
            argv = run_command(sweep, entry.name, resume, res.extra, res.nproc)
            env = dict(os.environ)
            if group is not None:
                env["CUDA_VISIBLE_DEVICES"] = group
            path = log_path(sweep, entry.name)
            with path.open("a", encoding="utf-8") as out:
                with lock:
                    if stop.is_set():
                        return
                    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip  # Ctrl-C reaches it once, from us
                    procs[entry.name] = proc
                    entry.status, entry.error = "running", None
                    write_index(sweep)
                    on = f" on GPU {group}" if group is not None else ""
                    log(f"[sweep] {i}/{len(todo)} {entry.name}: {'resuming' if resume else 'starting'}{on} "
                        f"(pid {proc.pid}, log {path})")  # fmt: skip
                _header(out, argv, proc.pid, env if group is not None else None)
                code = proc.wait()
            with lock:
                procs.pop(entry.name, None)
                now = run_status(run_dir)
                if code == 0 and now == "finished":
                    entry.status = "finished"
                    log(f"[sweep] {entry.name}: finished")
                elif stop.is_set() or code in (130, -signal.SIGINT):
                    entry.status = "interrupted" if now == "interrupted" else "pending"
                    log(f"[sweep] {entry.name}: {entry.status}")
                else:
                    entry.status, entry.error = "failed", _error_line(path, code)
                    failed.append(entry)
                    log(f"[sweep] {entry.name} failed: {entry.error} (log {path})")
                write_index(sweep)
        finally:
            slots.put(group)

    pool = ThreadPoolExecutor(max_workers=res.jobs, thread_name_prefix="retain-sweep")
    futures = []
    for i, entry in enumerate(todo, 1):
        entry.status, entry.error = run_status(sweep.path / entry.name), None
        if entry.status == "finished":
            log(f"[sweep] {i}/{len(todo)} {entry.name}: finished before, skipped")
            continue
        with lock:
            futures.append(pool.submit(one, i, entry))
    with lock:
        write_index(sweep)
    previous = _sigterm_as_interrupt()
    try:
        for future in as_completed(futures):
            future.result()
    except KeyboardInterrupt:
        stopped = _stop(stop, lock, procs)
        pool.shutdown(wait=True, cancel_futures=True)
        with lock:
            write_index(sweep)
        raise KeyboardInterrupt(f"{stopped} running run(s) stopped (a checkpoint saved)" if stopped else "") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    return failed


def _sigterm_as_interrupt() -> Any:
    """SIGTERM (a job scheduler ending the sweep command) stops the runs as Ctrl-C does; the previous handler.

    Ctrl-C raises KeyboardInterrupt here even when this process started with SIGINT ignored (launched in the
    background of a non-interactive shell: Python then installs no handler), as ``retain run`` handles it too."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        return None
    _sigint_raises()
    return signal.signal(signal.SIGTERM, handler)


def _sigint_raises() -> None:
    """Ctrl-C raises KeyboardInterrupt in this (main) thread even if the process started with SIGINT ignored."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop(stop: threading.Event, lock: threading.Lock, procs: dict[str, subprocess.Popen]) -> int:
    """SIGINT to each running run, then up to STOP_WAIT_S for them all (a second Ctrl-C: kill them now)."""
    with lock:
        stop.set()
        running = list(procs.values())
    print(f"retain: Ctrl-C: stopping {len(running)} running run(s) (a checkpoint each; Ctrl-C again: kill them)",
          file=sys.stderr, flush=True)  # fmt: skip
    for p in running:
        p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_WAIT_S
    try:
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
    except KeyboardInterrupt:
        for p in running:
            p.kill()
    for p in running:
        p.wait()
    return len(running)


# ----------------------------------------------------------------------------------------------- submitit


def _preemption_signal() -> int:
    """The signal by which a cluster tells a job it is preempted or timed out (submitit's: USR2 unless set)."""
    try:
        from submitit.core.job_environment import JobEnvironment

        return int(JobEnvironment._usr_sig())
    except (ImportError, RuntimeError, AttributeError):
        return int(signal.SIGUSR2)


class RunJob:
    """The callable of one submitit job: ``retain run`` of one sweep run in a child process, ``--resume`` when its
    folder holds a started run (so a requeued or resubmitted job continues). ``checkpoint()`` (submitit calls it on
    preemption or timeout) stops the run with SIGINT (it saves a mid-task checkpoint) and requeues this job."""

    def __init__(self, name: str, fresh: list[str], resume: list[str], run_dir: str, log: str, cwd: str,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name, self.fresh, self.resume, self.run_dir, self.log = name, fresh, resume, run_dir, log
        self.cwd, self.env = cwd, env or {}
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc = None

    def __call__(self) -> str:
        argv = self.resume if run_status(self.run_dir) == "interrupted" else self.fresh
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as out:
            env = {**os.environ, **self.env}
            sig = _preemption_signal()  # the job's process handles it (checkpoint()); the run ignores it

            def ignore() -> None:
                signal.signal(sig, signal.SIG_IGN)

            self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                          start_new_session=True, preexec_fn=ignore)  # fmt: skip
            _header(out, argv, self._proc.pid, self.env or None)
            try:
                code = self._proc.wait()
            except KeyboardInterrupt:  # the job is cancelled (local executor): the run saves a checkpoint and stops
                self._halt()
                raise
        self._proc = None
        if code != 0:
            raise RuntimeError(f"{self.name}: {_error_line(Path(self.log), code)} (retain run exit code {code})")
        return run_status(self.run_dir)

    def _halt(self) -> None:
        """SIGINT to the run, then up to STOP_WAIT_S for it to exit (it saves a checkpoint), else SIGKILL. Called
        from a signal handler that interrupted ``Popen.wait`` (which holds the lock ``poll``/``wait`` need), so the
        run is reaped here with ``os.waitpid``."""
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped already
                return
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return
            time.sleep(0.1)
        proc.kill()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        self._halt()
        self._proc = None
        return DelayedSubmission(self)


def _settings(items: Sequence[str]) -> dict[str, Any]:
    """``--launcher-set key=value`` items as submitit parameters (values read as YAML: 4 is an int)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--launcher-set {item!r}: give key=value, e.g. slurm_qos=high")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _executor(sweep: Sweep, launcher: str, params: dict[str, Any]) -> Any:
    import submitit

    try:
        executor = submitit.AutoExecutor(folder=sweep.path / JOB_DIR / "%j", cluster=launcher)
    except RuntimeError as e:  # e.g. no srun: not on a Slurm cluster
        raise ConfigError(f"--launcher {launcher}: {str(e).splitlines()[0]}") from None
    try:
        executor.update_parameters(**params)
    except (ValueError, TypeError, NameError) as e:  # submitit names the unknown parameter
        raise ConfigError(f"--launcher {launcher}: {str(e).splitlines()[0]}") from None
    return executor


def submit_sweep(sweep: Sweep, launcher: str, jobs: int | None = None, gpus_per_run: int | None = None,
                 cpus_per_run: int | None = None, time_min: int = 240, partition: str | None = None,
                 account: str | None = None, settings: Sequence[str] = (),
                 log: Callable[[str], Any] = print) -> list[SweepRun]:  # fmt: skip
    """One submitit job per unfinished run (a started one resumes). ``slurm``: an array job, submitted and left to
    the cluster (``jobs``: at most that many at once); returns no runs. ``local``: jobs on this machine, ``jobs``
    (default 1) at a time, waited for; returns those that did not finish. Job ids go into the index."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher}: one of {', '.join(LAUNCHERS)}")
    if time_min < 1:
        raise ConfigError(f"--time {time_min}: minutes, at least 1")
    if sweep.preset is None:
        raise ConfigError("a sweep without a preset runs in this process only (no --launcher)")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise ConfigError(f"--gpus-per-run {gpus_per_run}: 0 (slurm: CPU jobs) or more")
    extra_set = _settings(settings)
    params: dict[str, Any] = {"timeout_min": time_min, "name": f"retain-{sweep.path.name}", "nodes": 1,
                              "tasks_per_node": 1}  # fmt: skip
    todo = [r for r in sweep.runs if r.name in sweep.configs]
    if launcher == "slurm":
        on_cpu = {c.train.device for c in sweep.configs.values()} == {"cpu"}
        k = 0 if on_cpu else (1 if gpus_per_run is None else gpus_per_run)  # --gpus-per-run 0: CPU jobs
        params["cpus_per_task"] = cpus_per_run or 8 * max(k, 1)
        if k:
            params["gpus_per_node"] = k
        params.update({f"slurm_{key}": v for key, v in (("partition", partition), ("account", account)) if v})
        if jobs:
            params["slurm_array_parallelism"] = jobs
        res = Resources(len(todo), [], max(k, 1), [])
        if not k and not _given(sweep, "train.threads"):
            res.extra = [f"train.threads={params['cpus_per_task']}"]
    else:
        res = plan_resources(sweep, jobs or 1, gpus_per_run)
    params.update(extra_set)
    executor = _executor(sweep, launcher, params)
    (sweep.path / LOG_DIR).mkdir(parents=True, exist_ok=True)

    def job_of(entry: SweepRun, group: str | None = None) -> RunJob:
        env = {"CUDA_VISIBLE_DEVICES": group} if group is not None else {}
        return RunJob(entry.name, run_command(sweep, entry.name, False, res.extra, res.nproc),
                      run_command(sweep, entry.name, True, res.extra, res.nproc), str(sweep.path / entry.name),
                      str(log_path(sweep, entry.name)), os.getcwd(), env)  # fmt: skip

    pending = []
    for i, entry in enumerate(todo, 1):
        entry.error = None
        status = run_status(sweep.path / entry.name)
        if status == "finished":
            entry.status = "finished"
            log(f"[sweep] {i}/{len(todo)} {entry.name}: finished before, skipped")
        elif entry.job_id and entry.launcher == launcher and job_state(sweep.path, entry) in _ACTIVE:
            log(f"[sweep] {i}/{len(todo)} {entry.name}: still queued or running as {launcher} job {entry.job_id}")
        else:
            entry.status = status
            pending.append(entry)
    write_index(sweep)
    if launcher == "slurm":
        if pending:
            with executor.batch():
                submitted = [executor.submit(job_of(e)) for e in pending]
            for entry, job in zip(pending, submitted, strict=True):
                entry.status, entry.job_id, entry.launcher = "submitted", str(job.job_id), launcher
                log(f"[sweep] {entry.name}: submitted as slurm job {job.job_id}")
            write_index(sweep)
        return []
    return _wait_local(sweep, executor, pending, res, job_of, log)


def _wait_local(sweep: Sweep, executor: Any, pending: list[SweepRun], res: Resources,
                job_of: Callable[..., RunJob], log: Callable[[str], Any]) -> list[SweepRun]:  # fmt: skip
    groups: list[str | None] = list(res.gpu_groups) or [None] * res.jobs
    active: dict[str, tuple[Any, SweepRun, str | None]] = {}
    left, failed = list(pending), []
    _sigint_raises()
    try:
        while left or active:
            while left and groups:
                entry, group = left.pop(0), groups.pop(0)
                resume = run_status(sweep.path / entry.name) == "interrupted"
                job = executor.submit(job_of(entry, group))
                active[entry.name] = (job, entry, group)
                entry.status, entry.job_id, entry.launcher = "running", str(job.job_id), "local"
                on = f" on GPU {group}" if group is not None else ""
                log(f"[sweep] {entry.name}: {'resuming' if resume else 'starting'} as local job {job.job_id}{on}")
                write_index(sweep)
            for name, (job, entry, group) in list(active.items()):
                if not job.done():
                    continue
                del active[name]
                groups.append(group)
                error = job.exception()
                now = run_status(sweep.path / name)
                if error is None and now == "finished":
                    entry.status = "finished"
                    log(f"[sweep] {name}: finished")
                else:
                    entry.status = "interrupted" if now == "interrupted" else "failed"
                    entry.error = _job_error(error) if error is not None else f"the run ended {now}"
                    failed.append(entry)
                    log(f"[sweep] {name} {entry.status}: {entry.error}")
                write_index(sweep)
            time.sleep(_POLL_S if active else 0)
    except KeyboardInterrupt:
        for job, _, _ in active.values():
            job.cancel()  # SIGINT: the job passes it to its run, which saves a checkpoint
        for job, entry, _ in active.values():
            deadline = time.monotonic() + STOP_WAIT_S
            while not job.done() and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            entry.status = "interrupted" if run_status(sweep.path / entry.name) == "interrupted" else "pending"
        write_index(sweep)
        raise KeyboardInterrupt(f"{len(active)} local job(s) stopped" if active else "") from None
    return failed


def _job_error(error: BaseException) -> str:
    """The run's error line inside submitit's wrapped exception (its text ends with the job's traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    mine = [ln.split("RuntimeError: ", 1)[1] for ln in lines if "RuntimeError: " in ln]
    return mine[-1] if mine else (lines[-1] if lines else type(error).__name__)


# ----------------------------------------------------------------------------------------------- --status


def job_state(sweep_dir: Path, entry: SweepRun) -> str:
    """The launcher's state of the run's job: Slurm's (sacct) or, for a local job, RUNNING while its process lives;
    ``unknown`` where it cannot be told."""
    if not entry.job_id:
        return ""
    try:
        if entry.launcher == "slurm":
            import submitit

            return str(submitit.SlurmJob(sweep_dir / JOB_DIR / "%j", entry.job_id).state)
        if entry.launcher == "local":
            try:
                os.kill(int(entry.job_id), 0)
                alive = True
            except (ProcessLookupError, ValueError):
                alive = False
            except PermissionError:
                alive = True
            if alive:
                return "RUNNING"
            result = sweep_dir / JOB_DIR / entry.job_id / f"{entry.job_id}_0_result.pkl"
            if not result.is_file():
                return "ENDED"  # killed: no result written
            import pickle

            with result.open("rb") as f:
                outcome = pickle.load(f)[0]  # ("success", value) or ("error", traceback text)
            return "COMPLETED" if outcome == "success" else "FAILED"
    except Exception:  # noqa: BLE001 - a state is a hint: sacct may be missing or slow
        return "unknown"
    return "unknown"


def status_lines(sweep_dir: Path, runs: list[SweepRun]) -> list[str]:
    """One line per run: the folder's status, the index's (when it differs), the job id and its state."""
    lines = []
    for r in runs:
        now = run_status(sweep_dir / r.name)
        index = f" (index: {r.status})" if r.status != now else ""
        job = f"  {r.launcher} job {r.job_id}: {job_state(sweep_dir, r)}" if r.job_id else ""
        error = f"  error: {r.error}" if r.error and now != "finished" else ""
        lines.append(f"  {now:<11s} {r.name}{index}{job}{error}")
    return lines
