"""``retain demo``: the project's own CIFAR-10 backbones fine-tuned on scikit-learn's digits, offline, on a CPU.

Three short streams, each with the methods that fit its protocol (:data:`STREAMS`):

1. ``class_il``: the shipped ViT on Split digits (5 x 2 classes): finetune, SimpleCIL, LwF, LN tuning, joint;
2. ``task_il``: the shipped ResNet-20 (finetune vs ConFiT and its two halves) and the shipped ViT (LwF vs
   asymmetric PAD) on Split digits, task-incremental;
3. ``retention``: the shipped ViT fine-tuned once on all of digits (full, linear probe, LoRA, Block Expansion), with
   the CIFAR-10 weighted k-NN accuracy (the shipped ``cifar10_sample``) before and after.

Each stream prints its runs' accuracy matrices, a table and a one-line verdict computed from the table; the report
(``<out-dir>/report/``) holds every table and verdict plus one ``retain report`` per stream.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retain.config import load_config  # light: stdlib + yaml (the parser is built on every command)

__all__ = ["DEMO_OVERRIDES", "STREAMS", "Entry", "Stream", "add_demo_arguments", "demo", "demo_from_args"]


@dataclass(frozen=True)
class Entry:
    """One run of a stream: a row of its table."""

    label: str  # the row's name
    method: str
    preset: str  # retain/configs/<preset>.yaml
    overrides: tuple[str, ...] = ()
    group: str = ""  # rows compared with each other (task-IL: the backbone); the group's first row is its baseline
    full_only: bool = False  # skipped by --quick


@dataclass(frozen=True)
class Stream:
    """A protocol, its runs and its table's columns."""

    name: str
    title: str
    entries: tuple[Entry, ...]
    columns: tuple[str, ...] = ()


# Settings per method on top of its stream's preset, also used by a custom ``--methods`` stream. The linear probe
# trains a head on cached features: a larger step costs little. LN rows move little at the full-fine-tuning lr;
# 0.005 is the LN-tuning paper's effective ImageNet-R lr. finetune is FACIL's (current head, old heads frozen): LwF
# and EWC each add one term to it (docs/baselines.md).
DEMO_OVERRIDES: dict[str, list[str]] = {
    "finetune": ["method.train_mask=current"],
    "linear_probe": ["train.lr=0.01", "train.epochs=10"],
    "ln_tuning": ["train.lr=0.005"],
    "lora": ["train.lr=0.005"],  # class-IL on digits: 46.4 % vs 20.0 % at the finetune lr (docs/peft_vit.md)
    # the L2P / DualPrompt ports' rule 0.03 x batch 32 / 256 with the repos' Adam, not a value read off the test stream
    # (docs/prompts.md: the study's 4-point sweep)
    "coda_prompt": ["train.lr=0.00375"],
}
# the retention stream's learning rates: PEFT-ViT's (full 0.005, LoRA and Block Expansion 0.05; docs/peft_vit.md);
# the linear probe's 0.005 was set for 10,000 steps, 0.05 suits the demo's 150
RETENTION_LR = {"finetune": "0.005", "linear_probe": "0.05", "lora": "0.05", "block_expansion": "0.05"}


def _cols(names: str) -> tuple[str, ...]:
    """A table's columns: ``names`` then the cost columns every stream shows."""
    return (*names.split(), "trainable_params", "bytes_per_task", "seconds")


_CIL, _RES, _VIT, _RET = "demo/default", "demo/task_il_resnet", "demo/task_il_vit", "demo/retention"
STREAMS: dict[str, Stream] = {
    s.name: s
    for s in (
        Stream(
            "class_il",
            "class-incremental, the shipped CIFAR-10 ViT",
            (
                Entry("finetune", "finetune", _CIL, tuple(DEMO_OVERRIDES["finetune"])),
                Entry("SimpleCIL", "simplecil", _CIL),
                Entry("LwF", "lwf", _CIL),
                Entry("LN tuning", "ln_tuning", _CIL, tuple(DEMO_OVERRIDES["ln_tuning"])),
                Entry("CODA-P", "coda_prompt", _CIL, tuple(DEMO_OVERRIDES["coda_prompt"])),
                Entry("joint (upper bound)", "joint", _CIL),
            ),
            columns=_cols("label lr average_accuracy average_incremental_accuracy forgetting task_id_accuracy"),
        ),
        Stream(
            "task_il",
            "task-incremental, the shipped CIFAR-10 ResNet-20 and ViT (TAw: task id given; TAg: not)",
            (
                Entry("finetune", "finetune", _RES, group="ResNet-20"),
                Entry("ConFiT", "confit", _RES, group="ResNet-20"),
                Entry("hierarchical FT alone", "confit", _RES, ("method.xconv_bn=false",), "ResNet-20", True),
                Entry("Xconv BN alone", "confit", _RES, ("method.hierarchical=false",), "ResNet-20", True),
                Entry("LwF", "lwf", _VIT, group="ViT"),
                Entry("LwF + asym. PAD", "pad", _VIT, group="ViT"),
            ),
            columns=_cols("group label lr average_accuracy forgetting tag_average_accuracy tag_forgetting"),
        ),
        Stream(
            "retention",
            "fine-tuning once, with retention of CIFAR-10 (weighted k-NN), the shipped CIFAR-10 ViT",
            tuple(
                Entry(label, method, _RET, (f"train.lr={RETENTION_LR[method]}", *extra))
                for label, method, extra in (
                    ("full fine-tuning", "finetune", ()),
                    ("linear probe", "linear_probe", ()),
                    ("LoRA r=4 (q, v)", "lora", ("method.r=4",)),
                    ("Block Expansion p=1", "block_expansion", ()),
                )
            ),
            columns=_cols("label lr average_accuracy retention_before retention_after retention_change"),
        ),
    )
}
# --quick, per preset: a quarter of the training images and one epoch per task (ResNet: five epochs of batch 16, so
# that ConFiT's hierarchical schedule keeps its three phases), 60 steps and a 20-per-class k-NN probe (200 memory
# images, 200 queries: 0.5 point per query; saves ~10 s) for the retention stream
QUICK: dict[str, tuple[str, ...]] = {
    _CIL: ("scenario.train_fraction=0.25", "train.epochs=1"),
    _RES: ("scenario.train_fraction=0.25", "train.batch_size=16"),
    _VIT: ("scenario.train_fraction=0.25", "train.epochs=1"),
    _RET: ("train.steps=60", "train.warmup_steps=3", "data.retention.options={per_class: 20}"),
}
_HEADERS = {
    "label": "method",
    "group": "backbone",
    "lr": "lr",
    "average_accuracy": "avg acc",
    "average_incremental_accuracy": "avg inc acc",
    "forgetting": "forgetting",
    "task_id_accuracy": "task-id acc",
    "tag_average_accuracy": "TAg acc",
    "tag_forgetting": "TAg forgetting",
    "retention_before": "CIFAR-10 k-NN before",
    "retention_after": "k-NN after",
    "retention_change": "change",
    "trainable_params": "trainable params",
    "bytes_per_task": "bytes/task",
    "seconds": "time (s)",
}
_STREAM_HEADERS = {"task_il": {"average_accuracy": "TAw acc", "forgetting": "TAw forgetting"},
                   "retention": {"average_accuracy": "digits acc"}}  # fmt: skip


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", nargs="+", choices=list(STREAMS), default=None, metavar="STREAM",
                   help=f"run only these streams ({' | '.join(STREAMS)}; default: all three)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="~1.5 min: less data, fewer epochs, no ablations")
    p.add_argument("--methods", nargs="+", default=None,
                   help="one custom stream of these methods (protocol of --stream, default class_il)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="epochs per task for every run (default: the preset's)")
    p.add_argument("--dataset", default=None, help="digits (default), fashion_mnist (Debian package), synthetic")
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (default 5; not in retention)")
    p.add_argument("--train-fraction", type=float, default=None, help="fraction of each task's train set to use")
    p.add_argument("--test-fraction", type=float, default=None, help="fraction of each task's test set to use")
    p.add_argument("--out-dir", default="runs/demo", help="where run directories go (default runs/demo)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides for every run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _custom_stream(methods: Sequence[str], protocol: str) -> Stream:
    """``--methods``: those methods on one protocol's stream, with the demo's settings for each."""
    base = STREAMS[protocol]
    preset = _RET if protocol == "retention" else _VIT if protocol == "task_il" else _CIL
    known = {e.method: e for e in base.entries if not e.full_only and e.preset in (preset, _CIL)}
    entries = []
    for m in methods:
        if m in known:
            entries.append(Entry(m, m, preset, known[m].overrides))
        else:
            extra = [f"train.lr={RETENTION_LR[m]}"] if protocol == "retention" and m in RETENTION_LR else []
            entries.append(Entry(m, m, preset, tuple(DEMO_OVERRIDES.get(m, []) + extra)))
    columns = tuple(c for c in base.columns if c != "group")
    return Stream(base.name, base.title, tuple(entries), columns)


def _overrides(entry: Entry, stream: Stream, name: str, args: argparse.Namespace) -> list[str]:
    over = [f"method.name={entry.method}", *entry.overrides]
    over += list(QUICK[entry.preset]) if args.quick else []
    flags = {"data.name": args.dataset, "scenario.n_tasks": args.tasks, "train.epochs": args.epochs,
             "scenario.train_fraction": args.train_fraction, "scenario.test_fraction": args.test_fraction}  # fmt: skip
    over += [f"{k}={v}" for k, v in flags.items() if v is not None]
    over += [f"out_dir={args.out_dir}", f"name={name}", f"train.progress={str(not args.quiet).lower()}"]
    return over + list(args.set)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


def _run_stream(stream: Stream, args: argparse.Namespace, stamp: str) -> list[dict[str, Any]]:
    """Run the stream's entries; returns one table row per run (``summary_rows`` + label, group, seconds)."""
    from retain.engine import run
    from retain.report import format_matrix, summary_rows

    entries = [e for e in stream.entries if not (args.quick and e.full_only)]
    rows = []
    for i, entry in enumerate(entries, 1):
        name = f"{stamp}-{stream.name}-{_slug(entry.label)}"
        cfg = load_config(entry.preset, _overrides(entry, stream, name, args))
        print(f"\n=== {stream.name} [{i}/{len(entries)}] {entry.label} ({cfg.model.backbone}, {cfg.data.name}) ===")
        start = time.perf_counter()
        try:
            record = run(cfg)
        except KeyboardInterrupt as e:  # Ctrl-C: the run saved a checkpoint; say how to finish it
            again = " ".join(shlex.quote(o) for o in [entry.preset, *_overrides(entry, stream, name, args)])
            raise KeyboardInterrupt(f"{e or 'stopped'}; the finished demo runs are kept in {args.out_dir}; "
                                    f"finish this one with: retain run {again} --resume") from None  # fmt: skip
        seconds = time.perf_counter() - start
        if stream.name == "task_il":
            print("task-aware (TAw) accuracy matrix:")
        print(format_matrix(record["accuracy_matrix"]))
        run_dir = Path(args.out_dir) / cfg.name
        row = summary_rows([run_dir])[0]
        if isinstance(row.get("retention_after"), float):
            row["retention_change"] = row["retention_after"] - row["retention_before"]
        extra = {"label": entry.label, "group": entry.group, "lr": cfg.train.lr, "seconds": seconds}
        rows.append(row | extra | {"settings": describe(cfg), "dir": run_dir})
    return rows


def _cell(key: str, value: Any) -> str:
    """A table cell: the report's format (``retain.report.tables.format_value``) and the demo's own columns."""
    from retain.report.tables import format_value

    if value is None or value == "-" or value == "":
        return "-"
    if key == "lr":
        return f"{float(value):g}"
    if key == "retention_change":
        return f"{float(value):+.1f}"
    if key == "seconds":
        return f"{float(value):.1f}"
    return format_value(key, value)


def table(stream: Stream, rows: Sequence[dict[str, Any]]) -> str:
    """The stream's markdown table."""
    headers = _HEADERS | _STREAM_HEADERS.get(stream.name, {})
    cols = [c for c in stream.columns if any(_cell(c, r.get(c)) != "-" for r in rows) or c in ("label", "seconds")]
    lines = ["| " + " | ".join(headers[c] for c in cols) + " |",
             "|" + "|".join(":---" if c in ("label", "group") else "---:" for c in cols) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(_cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _num(row: dict[str, Any], key: str) -> float:
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _class_il_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """Which continual method ends highest and which forgets least, next to the joint upper bound."""
    joint = [r for r in rows if r["method"] == "joint"]
    cl = [r for r in rows if r["method"] != "joint"] or list(rows)
    best = max(cl, key=lambda r: _num(r, "average_accuracy"))
    least = min(cl, key=lambda r: _num(r, "forgetting"))
    most = max(cl, key=lambda r: _num(r, "forgetting"))
    acc = f"{best['label']} ends highest ({_num(best, 'average_accuracy'):.1f} % avg acc"
    acc += f"; joint upper bound {_num(joint[0], 'average_accuracy'):.1f} %)" if joint else ")"
    if least is best:
        text = f"{acc} and forgets least ({_num(least, 'forgetting'):.1f} points)"
    else:
        text = f"{acc}; {least['label']} forgets least ({_num(least, 'forgetting'):.1f} points)"
    if most is not least:
        text += f"; {most['label']} forgets most ({_num(most, 'forgetting'):.1f})"
    return text + "."


def _compare(word_less: str, a: float, b: float) -> str:
    return "as much as" if abs(a - b) < 0.05 else word_less if a < b else "more than"


def _task_il_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """Per backbone, each method against the group's first row (its baseline), in task-aware forgetting."""
    parts = []
    for group in dict.fromkeys(r["group"] for r in rows):
        members = [r for r in rows if r["group"] == group]
        base, others = members[0], members[1:]
        bf, ba = _num(base, "forgetting"), _num(base, "average_accuracy")
        said = []
        for r in others:
            f, a = _num(r, "forgetting"), _num(r, "average_accuracy")
            said.append(f"{r['label']} forgets {_compare('less than', f, bf)} {base['label']} ({f:.1f} vs {bf:.1f} "
                        f"points) and ends at {a:.1f} vs {ba:.1f} % TAw")  # fmt: skip
        if others and "tag_average_accuracy" in base:
            r = others[0]
            said[0] += f", {_num(r, 'tag_average_accuracy'):.1f} vs {_num(base, 'tag_average_accuracy'):.1f} % TAg"
        parts.append(f"{group}: " + ", ".join(said) if said else f"{group}: {base['label']} only")
    return "; ".join(parts) + "."


def _retention_verdict(rows: Sequence[dict[str, Any]]) -> str:
    """Who loses most of the pre-training domain, who matches it on the new task for less, who keeps most."""

    def drop(r: dict[str, Any]) -> float:
        return -_num(r, "retention_change")

    def acc(r: dict[str, Any]) -> float:
        return _num(r, "average_accuracy")

    if any(drop(r) != drop(r) for r in rows):  # NaN: no retention probe
        best = max(rows, key=acc)
        return f"{best['label']} is the most accurate on the new task ({acc(best):.1f} %); no retention probe ran."
    worst, keep = max(rows, key=drop), min(rows, key=drop)
    before = _num(worst, "retention_before")
    text = f"{worst['label']} loses the most of CIFAR-10 (k-NN {before:.1f} -> {_num(worst, 'retention_after'):.1f})"
    better = [r for r in rows if r is not worst and acc(r) >= acc(worst) and drop(r) < drop(worst)]
    if better:
        text += " while " + " and ".join(f"{r['label']} ({acc(r):.1f} %, k-NN {-drop(r):+.1f})" for r in better)
        text += f" are as accurate or more on digits ({acc(worst):.1f} %)"
    else:
        text += f" for the best digits accuracy ({acc(worst):.1f} %)"
    if keep is not worst and keep not in better:
        text += f"; {keep['label']} keeps the most (k-NN {-drop(keep):+.1f}) at {acc(keep):.1f} % on digits"
    return text + "."


VERDICTS: dict[str, Callable[[Sequence[dict[str, Any]]], str]] = {
    "class_il": _class_il_verdict,
    "task_il": _task_il_verdict,
    "retention": _retention_verdict,
}


def _calm_openmp() -> None:
    """Shorten OpenMP's spin-wait (before torch loads). Measured on 2 cores with another 2-thread job running: a
    demo run took 52-122 s with the default spin, 10.6 s with ``GOMP_SPINCOUNT=1000``; alone, 14.6 vs 15.7 s."""
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def demo(args: argparse.Namespace) -> tuple[list[tuple[Stream, list[dict[str, Any]], str]], float]:
    """Run the chosen streams; returns (stream, table rows, verdict) for each and the total seconds."""
    _calm_openmp()
    if args.methods:
        protocol = (args.stream or ["class_il"])[0]
        streams = [_custom_stream(args.methods, protocol)]
    else:
        streams = [STREAMS[s] for s in (args.stream or STREAMS)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    start = time.perf_counter()
    results = []
    for stream in streams:
        rows = _run_stream(stream, args, stamp)
        verdict = VERDICTS[stream.name](rows)
        print("\n" + _section(stream, rows, verdict))
        results.append((stream, rows, verdict))
    return results, time.perf_counter() - start


def describe(cfg: Any) -> str:
    """A run's stream settings in one line (what the table's rows share, less the lr)."""
    from retain.metrics import storage_rule

    sc, t = cfg.scenario, cfg.train
    tasks = "1 task of all classes" if sc.protocol == "finetune" else f"{sc.n_tasks} tasks"
    budget = f"{t.steps} steps" if t.steps else f"{t.epochs} epoch{'s' if t.epochs != 1 else ''} per task"
    optimizer = f"{t.optimizer}" + (f" momentum {t.momentum:g}" if t.optimizer == "sgd" else "")
    optimizer += f", {t.schedule} schedule" if t.schedule != "constant" else ""
    retention = f", retention probe {cfg.data.retention.name}" if cfg.data.retention.name else ""
    rule = storage_rule(sc.protocol)
    storage = "everything the task changed" if rule == "deployment" else "the task's own tensors"
    return (f"`{cfg.model.backbone}` on {cfg.data.name}, {tasks} ({sc.protocol}), train fraction "
            f"{sc.train_fraction:g}, test fraction {sc.test_fraction:g}{retention}; {optimizer}, {budget}, batch "
            f"{t.batch_size}, {t.threads} threads, seed {cfg.seed}; bytes/task: {storage} ({rule} rule)")  # fmt: skip


def _settings(rows: Sequence[dict[str, Any]]) -> str:
    return "\n".join(f"- {line}" for line in dict.fromkeys(r["settings"] for r in rows))


def _section(stream: Stream, rows: Sequence[dict[str, Any]], verdict: str) -> str:
    return f"## {stream.name}: {stream.title}\n\n{_settings(rows)}\n\n{table(stream, rows)}\n\nverdict: {verdict}"


def write_demo_report(results: Sequence[tuple[Stream, list[dict[str, Any]], str]], out_dir: Path,
                      seconds: float, command: str) -> Path:  # fmt: skip
    """``out_dir/report.md`` (every stream's table and verdict) and ``out_dir/<stream>/`` (``retain report``)."""
    from retain.machine import machine_line
    from retain.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# retain demo", "", f"`{command}`: {seconds:.0f} s in all. Tables: percent; time = wall seconds per run "
             "(build, training, evaluation).", "", machine_line(), ""]  # fmt: skip
    for stream, rows, verdict in results:
        sub = write_report([r["dir"] for r in rows], out_dir / stream.name)
        link = f"Runs, plots and matrices: [{stream.name}/report.md]({sub.relative_to(out_dir).as_posix()})"
        parts += [_section(stream, rows, verdict).replace("\nverdict: ", "\n**Verdict:** "), "", link, ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(parts), encoding="utf-8")
    return report


def demo_from_args(args: argparse.Namespace) -> int:
    from retain.machine import machine_line

    results, seconds = demo(args)
    print("\n# Summary\n\n" + machine_line())
    for stream, rows, verdict in results:
        print("\n" + _section(stream, rows, verdict))
    command = "retain demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else "retain demo"
    report = write_demo_report(results, Path(args.out_dir) / "report", seconds, command.strip())
    print(f"\nall runs: {seconds:.0f}s; report: {report}")
    print(_next_steps(args.dataset or "digits"))
    return 0


def _next_steps(dataset: str) -> str:
    """What to try after the demo, depending on what this machine has."""
    bigger = "retain demo --stream class_il --dataset fashion_mnist --train-fraction 0.05 --test-fraction 0.2"
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        bigger = f"apt-get install dataset-fashion-mnist, then {bigger}"
    lines = ["next:"]
    if dataset != "fashion_mnist":
        lines.append(f"  a bigger stream:   {bigger}")
    lines += [
        "  one method, your settings:   retain run demo/default method.name=lwf train.epochs=5 name=my-lwf",
        "  a paper preset (GPU):        retain list   then e.g.  retain run confit/cifar100 data.root=DIR",
        "  inspect a preset offline:    retain inspect confit/cifar100 --json",
    ]
    return "\n".join(lines)
