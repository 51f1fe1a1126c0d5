"""Host reads (host-device synchronisations on a GPU) per training step, this tree against another checkout.

    python benchmarks/sync_count.py                      # this tree
    git worktree add /tmp/before 0359a31
    python benchmarks/sync_count.py --before /tmp/before  # side by side, one run

A read is a call that copies a tensor's value to the host (``item``, ``tolist``, ``bool``, ``float``) inside a
training epoch; the samplers' draws from their CPU generator are not counted (never on a device). Each method runs
two tasks of the tiny synthetic stream on the CPU, one process, batch 2 (24 steps); the count does not depend on the
device. Under several processes the old loop added one all-reduce (and its read) per step for the Ctrl-C agreement;
now it runs at the same sync steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("finetune", "lwf", "ewc")
PROBE = r"""
import json, sys, tempfile
from pathlib import Path
import torch
SAMPLERS = ("retain/engine/loading.py", "torch/utils/data/")
count = {"on": False, "reads": 0, "steps": 0}
for name in ("item", "tolist", "__bool__", "__float__"):
    real = getattr(torch.Tensor, name)
    def counted(self, *a, _real=real, **k):
        caller = sys._getframe(1).f_code.co_filename
        if count["on"] and not caller.endswith(SAMPLERS[0]) and SAMPLERS[1] not in caller:
            count["reads"] += 1
        return _real(self, *a, **k)
    setattr(torch.Tensor, name, counted)
from retain.config import load_config
from retain.engine import run, stages
real_epoch = stages.StageLoop.train_epoch
def epoch(self, *a, **k):
    first, count["on"] = self.pos.step, True
    try:
        return real_epoch(self, *a, **k)
    finally:
        count["on"], count["steps"] = False, count["steps"] + self.pos.step - first
stages.StageLoop.train_epoch = epoch
out = Path(tempfile.mkdtemp())
over = {"out_dir": str(out), "data.name": "synthetic", "data.image_size": "16", "scenario.n_tasks": "2",
        "data.options": "{n_classes: 4, n_per_class: 12, n_test_per_class: 6, image_size: 16}",
        "model.backbone": "vit_nano_patch4_32", "model.pretrained": "false",
        "model.kwargs": "{depth: 1, embed_dim: 32, num_heads: 2, img_size: 16}", "train.epochs": "1",
        "train.batch_size": "2", "train.progress": "false", "train.tensorboard": "false", "train.device": "cpu",
        "method.name": sys.argv[1]}
run(load_config(None, [f"{k}={v}" for k, v in over.items()]), log=lambda *_: None)
print(json.dumps({"reads": count["reads"], "steps": count["steps"]}))
"""


def count(tree: Path, method: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as cwd:  # import retain from ``tree``, not from the working directory
        done = subprocess.run([sys.executable, "-c", PROBE, method], env=env, cwd=cwd, capture_output=True,
                              text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, help="another checkout of retain to compare with")
    args = p.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = {"before": args.before, "now": here} if args.before else {"now": here}
    print("| method | " + " | ".join(f"reads per step ({k})" for k in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for method in METHODS:
        cells = []
        for tree in trees.values():
            c = count(tree, method)
            cells.append(f"{c['reads'] / c['steps']:.2f} ({c['reads']} in {c['steps']} steps)")
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
