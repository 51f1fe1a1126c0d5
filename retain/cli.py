"""Command line: parse into a RunConfig and call the library. Nothing here trains or evaluates by itself.

retain run PRESET_OR_YAML [key=value ...] [--resume] [--print-config]
retain list
retain inspect PRESET_OR_YAML [key=value ...] [--json]
retain pretrain PRESET_OR_YAML [key=value ...] [--export-dir DIR] [--fp32]
retain report RUN_DIR [RUN_DIR ...] [--out DIR]
retain demo [--methods ...] [--epochs N] [--dataset NAME] ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

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
    p.add_argument("--resume", action="store_true", help="continue after the last finished task")
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


def _cmd_demo(args: argparse.Namespace) -> int:
    from retain.demo import demo_from_args

    return demo_from_args(args)


COMMANDS = {"run": _cmd_run, "list": _cmd_list, "inspect": _cmd_inspect, "pretrain": _cmd_pretrain,
            "report": _cmd_report, "demo": _cmd_demo}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retain`` command; user errors print one line and return exit code 2."""
    from retain.config import ConfigError
    from retain.engine import RunError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, RunError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"retain: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retain: interrupted; finished tasks are saved, continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
