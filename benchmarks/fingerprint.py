"""Behaviour fingerprint: the accuracy matrices of every method on small digits streams (class-IL and task-IL).

Run it on two commits and compare, to show that a refactoring changed nothing (the seams issue used it: every
matrix identical before and after):

    python benchmarks/fingerprint.py before.json            # on the old commit
    python benchmarks/fingerprint.py after.json             # on the new one
    python benchmarks/fingerprint.py --compare before.json after.json

About 4 minutes on 2 cores. Runs that fail record their error instead of a matrix.
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
BASELINES = ["finetune", "linear_probe", "simplecil", "lwf", "ewc", "joint", "ln_tuning"]
CASES = {m: [f"method.name={m}"] for m in BASELINES}
CASES["ln_single"] = ["method.name=ln_tuning", "method.variant=single_stage"]
CASES["confit"] = ["method.name=confit", *CNN]


def fingerprint(out: Path) -> None:
    res: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for proto in ("class_il", "task_il"):
            for case, extra in CASES.items():
                over = [f"scenario.protocol={proto}", "data.name=digits", "scenario.n_tasks=5",
                        "scenario.train_fraction=0.3", "scenario.test_fraction=0.5", "train.epochs=2",
                        "train.progress=false", "train.tensorboard=false", f"out_dir={tmp}", f"name={proto}-{case}",
                        "train.threads=1", *extra]  # fmt: skip
                try:
                    rec = run(load_config("demo/default", over), log=lambda *_: None)
                    res[f"{proto}-{case}"] = rec["accuracy_matrix"]
                    res[f"{proto}-{case}-params"] = rec["trainable_params"]
                except Exception as e:  # noqa: BLE001 - a failing case is part of the fingerprint
                    res[f"{proto}-{case}"] = f"error: {type(e).__name__}: {e}"
                print(proto, case, res[f"{proto}-{case}"], flush=True)
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
