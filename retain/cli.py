"""Command line: parse into a RunConfig and call the library. Nothing here trains or evaluates by itself.

retain run PRESET_OR_YAML [key=value ...] [--resume] [--print-config]
retain list
retain inspect PRESET_OR_YAML [key=value ...] [--json]
retain pretrain PRESET_OR_YAML [key=value ...] [--export-dir DIR] [--fp32]
retain report RUN_DIR [RUN_DIR ...] [--out DIR]
retain export RUN_DIR -o FILE [--weights FILE]
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
    p = sub.add_parser("report", help="tables and plots from run directories")
    p.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    p.add_argument("--out", default=None, help="output folder (default: the first run's parent / report)")
    p = sub.add_parser("export", help="write a finished run's model as one artefact (safetensors)")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("-o", "--out", required=True, help="artefact file to write (.safetensors)")
    p.add_argument("--weights", default=None, help="the backbone's weights file here, if not where the run had it")
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
    _print_summary(record)
    return 0


def _print_summary(record: dict) -> None:
    from retain.report import format_matrix

    print(format_matrix(record["accuracy_matrix"]))
    for k, v in record.get("metrics", {}).items():
        print(f"{k:>30s}: {v:.2f}")


def _cmd_list(args: argparse.Namespace) -> int:
    from retain.config import preset_names
    from retain.data import DATASETS
    from retain.methods import method_names
    from retain.models import PRETRAINED_TAGS, backbone_names

    print("methods:   " + ", ".join(method_names()))
    print("datasets:  " + ", ".join(DATASETS.names()))
    print("presets:")
    for name in preset_names():
        print(f"  {name}")
    print("backbones (any timm name also works):")
    for name in backbone_names():
        info = PRETRAINED_TAGS.get(name)
        print(f"  {name}" + (f"  [{info.source}; {info.used_by}]" if info else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from retain.config import load_config
    from retain.inspect import inspect_config

    info = inspect_config(load_config(args.preset, args.overrides))
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:>22s}: {v}")
    return 0


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

    from retain.report import write_report

    out = Path(args.out) if args.out else Path(args.runs[0]).resolve().parent / "report"
    path = write_report(args.runs, out)
    print(path.read_text())
    print(f"written: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from retain.artefact import export_run

    meta = export_run(args.run_dir, args.out, args.weights)
    size = os.path.getsize(args.out)
    print(f"{args.out}: {meta['method']} on {meta['backbone']} (sha256 {meta['backbone_sha256'][:12]}), "
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
            "report": _cmd_report, "export": _cmd_export, "predict": _cmd_predict, "demo": _cmd_demo}  # fmt: skip


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retain`` command; user errors print one line and return exit code 2."""
    from retain.config import ConfigError
    from retain.engine import RunError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        with _one_line_warnings():
            return COMMANDS[args.command](args)
    except (ConfigError, RunError, OSError, KeyError, ValueError) as e:
        print(f"retain: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.command != "run":
            print("retain: interrupted", file=sys.stderr)
            return 130
        done = str(e) or "finished tasks are saved"
        again = " ".join(shlex.quote(a) for a in argv) + ("" if "--resume" in argv else " --resume")
        print(f"retain: interrupted: {done}; continue with: retain {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
