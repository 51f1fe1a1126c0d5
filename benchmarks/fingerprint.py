"""Behaviour fingerprint: what every registered method computes on small digits streams: class-IL and task-IL
accuracy matrices, trainable parameters, bytes per task, the sha256 of the last checkpoint's tensors, and the
fine-tuning protocol's retention k-NN for the methods that adapt one pre-trained ViT.

Run it on two commits and compare, to show that a refactoring changed nothing (the seams issue used it: every
matrix identical before and after):

    python benchmarks/fingerprint.py before.json            # on the old commit
    python benchmarks/fingerprint.py after.json             # on the new one
    python benchmarks/fingerprint.py --compare before.json after.json

About 7 minutes on 2 cores. Runs that fail record their error instead of a matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retain import load_config, run  # noqa: E402

CNN = ["model.backbone=cifar_resnet20.retain_cifar10", "train.epochs=5", "train.optimizer=sgd", "train.lr=0.01",
       "train.momentum=0.0"]  # fmt: skip
BASELINES = ["finetune", "linear_probe", "simplecil", "lwf", "ewc", "joint", "ln_tuning", "pad", "lora",
             "block_expansion"]  # fmt: skip
CASES = {m: [f"method.name={m}"] for m in BASELINES}
CASES["ln_single"] = ["method.name=ln_tuning", "method.variant=single_stage"]
CASES["pad_att"] = ["method.name=pad", "method.variant=attentional", "method.asymmetric=false"]
CASES["confit"] = ["method.name=confit", *CNN]
RETENTION = {m: [f"method.name={m}"] for m in ("finetune", "linear_probe", "lora", "block_expansion")}
RETENTION["block_p2_online"] = ["method.name=block_expansion", "method.split=2", "method.cache_prefix=false"]


def _weights(run_dir: Path) -> str:
    """Combined sha256 of the tensors of the run's last checkpoint."""
    from safetensors.torch import load_file

    from retain.engine.rundir import combined_sha256, state_sha256

    last = sorted((run_dir / "checkpoints").glob("task_*.safetensors"))[-1]
    return combined_sha256(state_sha256(load_file(str(last))))


def _case(res: dict, key: str, preset: str, over: list[str], tmp: str) -> None:
    try:
        rec = run(load_config(preset, over), log=lambda *_: None)
        res[key] = rec["accuracy_matrix"]
        res[f"{key}-params"] = rec["trainable_params"]
        res[f"{key}-bytes"] = rec["bytes_per_task"]
        res[f"{key}-weights"] = _weights(Path(tmp) / key)
        if rec.get("retention_knn"):
            res[f"{key}-knn"] = rec["retention_knn"]
    except Exception as e:  # noqa: BLE001 - a failing case is part of the fingerprint
        res[key] = f"error: {type(e).__name__}: {e}"
    print(key, res[key], flush=True)


def fingerprint(out: Path) -> None:
    res: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for proto in ("class_il", "task_il"):
            for case, extra in CASES.items():
                over = [f"scenario.protocol={proto}", "data.name=digits", "scenario.n_tasks=5",
                        "scenario.train_fraction=0.3", "scenario.test_fraction=0.5", "train.epochs=2",
                        "train.progress=false", "train.tensorboard=false", f"out_dir={tmp}", f"name={proto}-{case}",
                        "train.threads=1", *extra]  # fmt: skip
                _case(res, f"{proto}-{case}", "demo/default", over, tmp)
        for case, extra in RETENTION.items():
            over = ["scenario.train_fraction=0.3", "scenario.test_fraction=0.5", "train.steps=20", "train.lr=0.05",
                    "data.retention.options={per_class: 10}", "train.progress=false", "train.tensorboard=false",
                    f"out_dir={tmp}", f"name=finetune-{case}", "train.threads=1", *extra]  # fmt: skip
            _case(res, f"finetune-{case}", "demo/retention", over, tmp)
    out.write_text(json.dumps(res, indent=1))


def compare(a: Path, b: Path) -> int:
    x, y = json.loads(a.read_text()), json.loads(b.read_text())
    diff = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
    for k in diff:
        print(f"DIFF {k}: {x.get(k)} -> {y.get(k)}")
    print(f"{len(set(x) | set(y)) - len(diff)} identical, {len(diff)} different")
    return 1 if diff else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    raise SystemExit(compare(*args.compare) if args.compare else fingerprint(args.out) or 0)
