"""Command line: parse into a RunConfig and call the library. Nothing here trains or evaluates by itself.

Building the parser, ``--help``, ``list``, ``compare`` and ``report`` import no torch (``tests/test_cli_fast.py``):
each command imports what it needs inside its function, and ``list`` reads its names from ``retain.catalog``.

retain run PRESET_OR_YAML [key=value ...] [--resume] [--print-config]
retain list
retain inspect PRESET_OR_YAML [key=value ...] [--json]
retain pretrain PRESET_OR_YAML [key=value ...] [--export-dir DIR] [--fp32]
retain report RUN_OR_SWEEP_DIR [...] [--out DIR]
retain compare RUN_OR_SWEEP_DIR [...]
retain sweep PRESET_OR_YAML key=a,b,c [key=value ...] [--out DIR] [--dry-run] [--jobs N] [--gpus-per-run K]
             [--launcher local|slurm] [--partition P] [--account A] [--time MIN] [--cpus-per-run C]
             [--launcher-set KEY=VALUE ...]
retain sweep --status SWEEP_DIR
retain export RUN_DIR -o FILE [--weights FILE] [--format retain|timm] [--task T]
retain predict ARTEFACT IMAGE_OR_FOLDER [...] [--json] [--task T] [--weights FILE] [--device DEV]
retain demo [--methods ...] [--epochs N] [--dataset NAME] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import yaml

__all__ = ["main", "build_parser"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset name (see `retain list`) or path to a YAML file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 method.name=finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="retain", description="Continual fine-tuning without forgetting.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train a method over a scenario; writes runs/<name>/")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (mid-task or task end)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sub.add_parser("list", help="methods, presets, backbones and datasets")
    p = sub.add_parser("inspect", help="build the model (no downloads) and report parameters and storage")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("pretrain", help="pre-train a backbone from scratch and export weights + card")
    _add_config_args(p)
    p.add_argument("--export-dir", default=None, help="where to write <tag>.safetensors and <tag>.json")
    p.add_argument("--fp32", action="store_true", help="export float32 instead of float16")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p = sub.add_parser("report", help="HTML page + Markdown twin: tables and plots of runs and sweeps")
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>), sweep folders or folders of runs")
    p.add_argument("--out", default=None, help="output folder (default: SWEEP/report, or RUN/../report)")
    p = sub.add_parser("compare", help="the report's table of runs and sweeps in the terminal")
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>), sweep folders or folders of runs")
    p = sub.add_parser("sweep", help="run the cross product of key=a,b,c overrides into runs/<sweep name>/")
    _add_config_args(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="the sweep folder: its runs and sweep.json go into DIR (default: <out_dir>/<sweep name>, "
                   "e.g. runs/<preset>-sweep); the same command with the same --out skips finished runs")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="validate every run's config and list the runs; run nothing")
    p.add_argument(
        "--status",
        action="store_true",
        help="retain sweep --status SWEEP_DIR: each run's status, job id and job state; run nothing",
    )
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="up to N runs at once, each in its own process (default 1: one after another in this "
                   "process); GPUs: one per run (CUDA_VISIBLE_DEVICES), CPU: the cores divided (train.threads); "
                   "with --launcher: at most N jobs at once")  # fmt: skip
    p.add_argument(
        "--gpus-per-run",
        type=int,
        default=None,
        metavar="K",
        help="GPUs of each run (default 1 where the runs use a GPU); K > 1: torchrun --nproc_per_node K",
    )
    p.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help="one submitit job per run: slurm (an array job; the command returns once submitted) or "
                   "local (jobs on this machine, waited for)")  # fmt: skip
    p.add_argument("--partition", default=None, help="--launcher slurm: the partition (default: the cluster's)")
    p.add_argument("--account", default=None, help="--launcher slurm: the account to charge")
    p.add_argument("--time", type=int, default=240, metavar="MIN",
                   help="--launcher: a job's time limit in minutes (default 240); a job that reaches it saves a "
                   "checkpoint and is requeued")  # fmt: skip
    p.add_argument(
        "--cpus-per-run",
        type=int,
        default=None,
        metavar="C",
        help="--launcher slurm: CPUs of each job (default 8 per GPU); also train.threads on a CPU",
    )
    p.add_argument("--launcher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="any submitit parameter, e.g. slurm_qos=high, mem_gb=64, slurm_constraint=a100 "
                   "(repeatable)")  # fmt: skip
    p = sub.add_parser("export", help="write a finished run's model as one artefact (safetensors)")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("-o", "--out", required=True, help="artefact file to write (.safetensors)")
    p.add_argument("--weights", default=None, help="the backbone's weights file here, if not where the run had it")
    p.add_argument("--format", choices=("retain", "timm"), default="retain",
                   help="retain: the artefact (retain predict); timm: a timm state dict (plain models)")  # fmt: skip
    p.add_argument("--task", type=int, default=None, help="--format timm, task-incremental runs: the task to export")
    p = sub.add_parser("predict", help="class name of each image by an exported artefact")
    p.add_argument("artefact", help="file written by `retain export`")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--task", type=int, default=None, help="task-incremental runs: the task id of every image")
    p.add_argument("--weights", default=None, help="the backbone's weights file here, if not where the run had it")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: train.eval_batch_size)")
    from retain.demo import add_demo_arguments

    add_demo_arguments(sub.add_parser("demo", help="offline CPU demo: baselines and methods on a small stream"))
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from retain.config import config_to_dict, load_config
    from retain.engine import run

    cfg = load_config(args.preset, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    record = run(cfg, resume=args.resume)
    if _process() == "":  # one process, or rank 0 of several (torchrun)
        _print_summary(record)
    return 0


def _print_summary(record: dict) -> None:
    from retain.report import format_matrix

    print(format_matrix(record["accuracy_matrix"]))
    for k, v in record.get("metrics", {}).items():
        print(f"{k:>30s}: {v:.2f}")


def _cmd_list(args: argparse.Namespace) -> int:
    from retain.catalog import DATASET_NAMES, METHOD_NAMES, PRETRAINED_TAGS, backbone_names  # no torch (tested)
    from retain.config import preset_names

    print("methods:   " + ", ".join(sorted(METHOD_NAMES)))
    print("datasets:  " + ", ".join(sorted(DATASET_NAMES)))
    print("presets:")
    for name in preset_names():
        print(f"  {name}")
    print("backbones (any timm name also works):")
    for name in backbone_names():
        info = PRETRAINED_TAGS.get(name)
        print(f"  {name}" + (f"  [{info[0]}; {info[1]}]" if info else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from retain.config import load_config
    from retain.inspect import inspect_config

    info = inspect_config(load_config(args.preset, args.overrides))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            if k.startswith("disk_") and isinstance(v, int | list) and not isinstance(v, bool):
                v = ", ".join(map(_size, v)) if isinstance(v, list) else _size(v)
            print(f"{k:>22s}: {v}")
    return 0


def _size(n: int) -> str:
    """Bytes as a short decimal size: 3.3 GB, 512 kB, 17 B."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from retain.config import config_to_dict, load_config
    from retain.pretrain import pretrain

    cfg = load_config(args.preset, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    command = "retain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    card = pretrain(cfg, args.export_dir, fp16=not args.fp32, command=command)
    info = json.loads(card.read_text())
    print(f"test accuracy {info['test_accuracy']:.2f} %; weights {info['file']} (sha256 {info['sha256'][:12]}…)")
    print(f"card: {card}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from retain.report import HTML_FILE, compare, write_report
    from retain.sweep import SWEEP_FILE

    first = Path(args.runs[0]).resolve()
    default = first / "report" if (first / SWEEP_FILE).is_file() else first.parent / "report"
    path = write_report(args.runs, Path(args.out) if args.out else default)
    print(compare(args.runs), end="")
    print(f"written: {path.parent / HTML_FILE} (self-contained) and {path} (with its PNGs)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from retain.report import compare

    print(compare(args.runs), end="")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from retain.sweep import describe, plan_sweep, run_sweep

    if args.status:
        return _sweep_status(args.preset, args.overrides)
    for flag, value in (("--jobs", args.jobs), ("--gpus-per-run", args.gpus_per_run)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: give at least 1")
    sweep = plan_sweep(args.preset, args.overrides, args.out)  # every run's config is validated before anything runs
    if args.dry_run:
        print(describe(sweep))
        return 0
    from retain import launch

    only = [f for f, v in (("--partition", args.partition), ("--account", args.account), ("--cpus-per-run",
            args.cpus_per_run), ("--launcher-set", args.launcher_set or None), ("--time", args.time != 240 or None))
            if v is not None and args.launcher is None]  # fmt: skip
    if only:
        raise ValueError(f"{only[0]} applies to --launcher slurm (or local); without one, give --jobs N only")
    in_process = args.launcher is None and (args.jobs or 1) == 1 and (args.gpus_per_run or 1) == 1
    try:
        if in_process:
            failed = run_sweep(sweep)
        elif args.launcher is None:
            failed = launch.run_parallel(sweep, launch.plan_resources(sweep, args.jobs or 1, args.gpus_per_run))
        else:
            failed = launch.submit_sweep(sweep, args.launcher, args.jobs, args.gpus_per_run, args.cpus_per_run,
                                         args.time, args.partition, args.account, args.launcher_set)  # fmt: skip
    except KeyboardInterrupt as e:
        done = str(e) or "stopped at once"
        print(f"retain: interrupted: {done}; finished runs are kept in {sweep.path}; continue with: "
              f"{_sweep_again(args)}", file=sys.stderr)  # fmt: skip
        return 130
    where = shlex.quote(str(sweep.path))
    if args.launcher == "slurm":
        print(f"sweep: {sweep.path / 'sweep.json'}; status: retain sweep --status {where}; when the jobs are done: "
              f"retain report {where}; run the same command again to resubmit unfinished runs")  # fmt: skip
        return 0
    from retain.report import compare

    try:
        print(compare([sweep.path]), end="")
    except FileNotFoundError:  # no run has finished a task
        pass
    print(f"sweep: {sweep.path / 'sweep.json'}; report: retain report {where}")
    if failed:
        first = f"{failed[0].name} first: {failed[0].error} (see {sweep.path / 'sweep.json'}"
        if in_process:
            from retain.engine import RunError

            raise RunError(f"{len(failed)} run(s) of the sweep failed, {first})")
        print(f"retain: error: {len(failed)} run(s) of the sweep did not finish, {first}; the same command resumes "
              "interrupted runs)", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _sweep_again(args: argparse.Namespace) -> str:
    """The command that continues an interrupted sweep: the same one."""
    words = ["retain", "sweep", args.preset, *args.overrides]
    for flag, value in (("--out", args.out), ("--jobs", args.jobs), ("--gpus-per-run", args.gpus_per_run),
                        ("--launcher", args.launcher), ("--partition", args.partition), ("--account", args.account),
                        ("--cpus-per-run", args.cpus_per_run)):  # fmt: skip
        words += [flag, str(value)] if value is not None else []
    words += ["--time", str(args.time)] if args.launcher and args.time != 240 else []
    for item in args.launcher_set:
        words += ["--launcher-set", item]
    return shlex.join(words)


def _sweep_status(folder: str, extra: list[str]) -> int:
    from pathlib import Path

    from retain.launch import status_lines
    from retain.runindex import SWEEP_FILE, SweepRun, read_index

    path = Path(folder)
    if extra:
        raise ValueError(f"retain sweep --status takes a sweep folder only, not {extra[0]!r}")
    if not (path / SWEEP_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {SWEEP_FILE} here (retain sweep --status SWEEP_DIR)")
    runs = [SweepRun.from_dict(r) for r in read_index(path)["runs"]]
    print(f"sweep {path} ({len(runs)} runs)")
    print("\n".join(status_lines(path, runs)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from retain.artefact import export_run, self_contained

    if args.format == "timm":
        from retain.export_timm import export_timm

        meta = export_timm(args.run_dir, args.out, args.task, args.weights)
        print(f"{args.out}: {meta['method']} as timm {meta['timm_model']} {meta['timm_kwargs']}, "
              f"{os.path.getsize(args.out):,} bytes")  # fmt: skip
        return 0
    if args.task is not None:
        raise ValueError("--task applies to --format timm")
    meta = export_run(args.run_dir, args.out, args.weights)
    size = os.path.getsize(args.out)
    backbone = "self-contained" if self_contained(meta) else f"sha256 {meta['backbone_sha256'][:12]}"
    print(f"{args.out}: {meta['method']} on {meta['backbone']} ({backbone}), "
          f"{meta['tasks_trained']} task(s), {size:,} bytes")  # fmt: skip
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from retain.artefact import load

    predictions = load(args.artefact, args.weights, args.device).predict(args.images, args.task, args.batch_size)
    if args.json:
        print(json.dumps([asdict(p) for p in predictions], indent=1))
        return 0
    for p in predictions:
        print(f"{p.file}\t{p.name}" + (f"\ttask {p.task}" if p.task is not None else ""))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from retain.demo import demo_from_args

    return demo_from_args(args)


COMMANDS = {"run": _cmd_run, "list": _cmd_list, "inspect": _cmd_inspect, "pretrain": _cmd_pretrain,
            "report": _cmd_report, "compare": _cmd_compare, "sweep": _cmd_sweep, "export": _cmd_export,
            "predict": _cmd_predict, "demo": _cmd_demo}  # fmt: skip


def _process() -> str:
    """``"[rank R] "`` in a process other than rank 0 of a multi-process run (``torchrun``), else ``""``."""
    rank = os.environ.get("RANK", "0")
    return f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank != "0" else ""


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; for an error re-raised from a DataLoader worker, the worker's own one."""
    msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    lines = msg.splitlines() or [type(e).__name__]
    if lines[0].startswith("Caught ") and "Original Traceback" in msg:  # torch's wrapper: the last line is the error
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


@contextmanager
def _one_line_warnings() -> Iterator[None]:
    """retain's own warnings print as one ``retain: warning: ...`` line; others keep Python's format."""
    default = warnings.formatwarning

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 line: str | None = None) -> str:  # fmt: skip
        if f"{os.sep}retain{os.sep}" in filename:
            return f"retain: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = default


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors ``main`` prints as one line. ``RunError`` comes from the engine (torch): it is caught only where
    the engine was imported, which it was wherever one was raised; a command that never needed the engine does not
    import it for this."""
    from retain.config import ConfigError

    errors: tuple[type[BaseException], ...] = (ConfigError, OSError, KeyError, ValueError)
    context = sys.modules.get("retain.engine.context")
    return errors + ((context.RunError,) if context is not None else ())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retain`` command; user errors print one line and return exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        with _one_line_warnings():
            return COMMANDS[args.command](args)
    except _user_errors() as e:
        print(f"retain: error: {_process()}{_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if _process():  # rank 0 of a multi-process run says it once
            return 130
        if args.command != "run":  # a command that says where things stand puts it in the interrupt
            print(f"retain: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
            return 130
        done = str(e) or "finished tasks are saved"
        again = " ".join(shlex.quote(a) for a in argv) + ("" if "--resume" in argv else " --resume")
        launcher = "torchrun <same options> -m " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"retain: interrupted: {done}; continue with: {launcher}retain {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
