"""Disk per run of every registered method: every per-task checkpoint kept (``run.keep_checkpoints=all``, the former
behaviour) against the default (``last``: only what ``--resume`` and ``retain export`` read); and each per-task
checkpoint before and after it left out the tensors still equal to the model the run started from
(``retain.engine.rundir``: "before" stores every tensor of ``checkpoint_state()``).

- **demo scale, measured**: ``demo/default``'s model and stream shape (``vit_micro_patch4_32.retain_cifar10``, 5 tasks
  x 2 classes, Adam; ConFiT on ``cifar_resnet20.retain_cifar10``; PAD, ConFiT, Block Expansion and LoRA task-IL, as in
  ``benchmarks/method_costs.py``) on synthetic 32-px images, 1 epoch (what is written depends on tensor sizes, not on
  the images): each method runs once per policy, and the bytes of its run directory are summed on disk after the
  run; the artefact is ``retain export``'s file of the run. Per-task checkpoints: the file sizes of the ``all`` run
  ("after"), and of a third run storing every tensor (``rundir.unchanged`` patched to leave nothing out: "before").
- **ViT-B/16, 10 tasks, estimated**: ``retain inspect``'s disk estimate (``retain.inspect.disk_estimate``: tensor
  sizes of the built method, no training, file headers not counted) for ``vit_base_patch16_224`` on CIFAR-100 in 10
  tasks at 224 px with demo/default's training settings (ConFiT: ``confit/cifar100``'s ResNet-18 in 10 tasks, as it
  needs BatchNorm). Per-task checkpoints before: every tensor of ``checkpoint_state()``; after: less the parameters
  the estimate knows stay as built (``Method.checkpoint_bytes`` with ``inspect.dry_build``'s names: the backbone's
  that no stage trains, the heads of later tasks), an upper bound. ``peak`` is the most the run holds while it runs
  under the default. ``plateau copy``: the best-weights copy of ``train.schedule=plateau`` (in memory and in every
  mid-task checkpoint), the full model before, the stage's trained tensors and buffers now (its largest stage).

    python benchmarks/disk_per_run.py  # prints two markdown tables, writes benchmarks/results/disk_per_run.json
    python benchmarks/disk_per_run.py --methods finetune lora --out /tmp/disk.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from benchmarks.common import machine_info  # noqa: E402
from retain.artefact import export_run  # noqa: E402
from retain.config import RunConfig, load_config  # noqa: E402
from retain.engine import run, rundir  # noqa: E402
from retain.inspect import disk_estimate, dry_build  # noqa: E402
from retain.methods import method_names  # noqa: E402
from retain.methods.base import Method  # noqa: E402
from retain.models.adapters import trainable_names  # noqa: E402

CNN = "cifar_resnet20.retain_cifar10"
TASK_IL = {"pad", "confit", "block_expansion", "lora"}  # benchmarks/method_costs.py's paper protocols at toy scale
DEMO = ["data.name=synthetic", "data.options={n_classes: 10, n_per_class: 8, n_test_per_class: 2, image_size: 32}",
        "train.epochs=1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false",
        "train.device=cpu"]  # fmt: skip
VIT_B = ["model.backbone=vit_base_patch16_224.augreg_in21k_ft_in1k", "data.name=cifar100", "data.image_size=224",
         "scenario.n_tasks=10"]  # fmt: skip
POLICIES = ("all", "last")


def _protocol(method: str) -> list[str]:
    over = [f"method.name={method}", f"scenario.protocol={'task_il' if method in TASK_IL else 'class_il'}"]
    return over + ([f"model.backbone={CNN}", "train.epochs=5"] if method == "confit" else [])  # all three stages


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _demo_run(method: str, out_dir: Path, name: str, keep: str) -> Path:
    over = [*DEMO, *_protocol(method), f"out_dir={out_dir}", f"name={name}", f"run.keep_checkpoints={keep}"]
    run(load_config("demo/default", over), log=lambda *_: None)
    return out_dir / name


def _task_files(run_dir: Path) -> list[int]:
    return [p.stat().st_size for p in sorted((run_dir / "checkpoints").glob("task_*.safetensors"))]


def measure_demo(method: str, out_dir: Path) -> dict:
    """Bytes on disk after a real demo-scale run under each policy, the size of its artefact, and each per-task
    checkpoint's file before (every tensor) and after (without those equal to the initial model)."""
    row: dict = {}
    for keep in POLICIES:
        run_dir = _demo_run(method, out_dir, f"{method}-{keep}", keep)
        row[keep] = {"run_dir": _bytes(run_dir), "checkpoints": _bytes(run_dir / "checkpoints"),
                     "files": sorted(p.name for p in (run_dir / "checkpoints").iterdir())}  # fmt: skip
    export_run(out_dir / f"{method}-last", out_dir / f"{method}.safetensors")
    row["artefact"] = (out_dir / f"{method}.safetensors").stat().st_size
    with mock.patch.object(rundir, "unchanged", lambda tensors, initial: {}):  # the former files: every tensor
        before = _demo_run(method, out_dir, f"{method}-before", "all")
    row["per_task_checkpoint"] = {"before": _task_files(before), "after": _task_files(out_dir / f"{method}-all")}
    return row


def _plateau_copy(method: Method) -> dict[str, int | list[int]]:
    """Bytes of plateau's best-weights copy: the full model (before) and, for each stage plateau can run (one that
    validates, with a budget) of the last task, the model's state less the parameters that stage does not train
    (``Schedule.snapshot``, now)."""
    state, params = method.model.state_dict(), dict(method.model.named_parameters(remove_duplicate=False))
    now = []
    for stage in method.stages(method.scenario.tasks[-1]):
        if stage.has_budget and (stage.data is None if stage.validate is None else stage.validate):
            trained = set(trainable_names(method.model, stage.params))
            now.append(sum(v.numel() * v.element_size() for k, v in state.items() if k not in params or k in trained))
    return {"before": sum(v.numel() * v.element_size() for v in state.values()), "now_per_stage": now}


def vit_b_config(method: str, keep: str) -> RunConfig:
    if method == "confit":
        return load_config("confit/cifar100", ["scenario.n_tasks=10", f"run.keep_checkpoints={keep}"])
    return load_config("demo/default", [*VIT_B, *_protocol(method), f"run.keep_checkpoints={keep}"])


def estimate_vit_b(method: str) -> dict:
    """``retain inspect``'s disk estimate at ViT-B/16 x 10 tasks under each policy, each per-task checkpoint before
    (every tensor) and after (without the parameters known to stay as built), and the plateau copy."""
    cfg = vit_b_config(method, "all")
    scenario, built, unchanged = dry_build(cfg)
    row = {"backbone": cfg.model.backbone, "n_tasks": scenario.n_tasks}
    for keep in POLICIES:
        cfg.run.keep_checkpoints = keep
        row[keep] = disk_estimate(cfg, scenario, built, unchanged)
    before = disk_estimate(cfg, scenario, built)["disk_checkpoint_bytes"]
    row["per_task_checkpoint"] = {"before": before, "after": row["all"]["disk_checkpoint_bytes"]}
    built.model.set_seen(scenario.n_tasks)
    row["plateau_copy"] = _plateau_copy(built)
    return row


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _change(sizes: dict[str, list[int]], i: int) -> str:
    """Task ``i``'s per-task checkpoint, before -> after."""
    return f"{_size(sizes['before'][i])} -> {_size(sizes['after'][i])}"


def table(rows: dict[str, dict]) -> str:
    """The markdown tables of ``rows`` (method -> {"demo": ..., "vit_b": ...}): per-task checkpoints before and after
    leaving out what equals the initial model, then the disk per run."""
    lines = ["| method | demo: first task's checkpoint | demo: last task's | demo: all 5 | ViT-B/16 x10: first task's "
             "checkpoint | ViT-B/16 x10: last task's | ViT-B/16 x10: all 10 |", "|---|" + "---:|" * 6]  # fmt: skip
    for method, r in rows.items():
        d, v = r["demo"]["per_task_checkpoint"], r["vit_b"]["per_task_checkpoint"]
        total = {k: [sum(d[k])] for k in d}, {k: [sum(v[k])] for k in v}
        cells = [_change(d, 0), _change(d, -1), _change(total[0], 0), _change(v, 0), _change(v, -1),
                 _change(total[1], 0)]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "| method | demo: keep all | demo: last (default) | demo: artefact | ViT-B/16 x10: keep all | "
              "ViT-B/16 x10: last (default) | ViT-B/16 x10: artefact | ViT-B/16 x10: peak while running (default) | "
              "plateau copy: before -> now (per stage) |", "|---|" + "---:|" * 8]  # fmt: skip
    for method, r in rows.items():
        d, v, copy = r["demo"], r["vit_b"], r["vit_b"]["plateau_copy"]
        now = " / ".join(map(_size, copy["now_per_stage"]))
        plateau = f"{_size(copy['before'])} -> {now}" if now else "n/a (no stage validates)"
        cells = [d["all"]["run_dir"], d["last"]["run_dir"], d["artefact"], v["all"]["disk_at_end"],
                 v["last"]["disk_at_end"], v["last"]["disk_artefact_bytes"], v["last"]["disk_peak"]]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(map(_size, cells)) + f" | {plateau} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=method_names(), choices=method_names())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "disk_per_run.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            rows[method] = {"demo": measure_demo(method, Path(tmp)), "vit_b": estimate_vit_b(method)}
            print(f"{method}: done", file=sys.stderr, flush=True)
    result = {
        "what": "bytes per run: demo scale measured on disk after a real run (the run directory; the artefact "
                "exported separately), ViT-B/16 x 10 tasks estimated from tensor sizes (retain inspect's disk_*: at "
                "the end, the kept per-task checkpoints); all = every per-task checkpoint kept, last = the default; "
                "per_task_checkpoint: each per-task checkpoint before (every tensor) and after leaving out the "
                "tensors equal to the initial model (demo: file sizes on disk; ViT-B: tensor sizes, an upper bound)",
        "command": "python benchmarks/disk_per_run.py", "machine": machine_info(),
        "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    return result


if __name__ == "__main__":
    main()
