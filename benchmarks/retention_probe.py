"""Host RAM of the retention probe, before and after issue #25 item 6, on a CPU stand-in: 2 processes (torchrun,
gloo, one thread each) probe a synthetic retention set through a ViT with no blocks (a patch embedding to 768-d
features, so the pass is cheap and the feature bank has ViT-B's width), and each reports the peak of its resident
memory during the probe above what it held just before.

- before: the old path, kept here (``_old_extract``): ``Method.extract_features`` as it was (the features as the
  model returns them, on the CPU a view that keeps the ViT's tokens; ``gather_rows``: every process gathers the
  whole set on the CPU) and ``weighted_knn_accuracy`` on every process.
- after: ``retention_accuracy``: each process keeps its shard, rank 0 alone receives the bank (into one buffer),
  normalises it in place and runs the k-NN, the accuracy is broadcast; each batch's features are copied out of the
  tokens they view (``features._compact``). On a GPU the bank is on the device; on this
  CPU stand-in rank 0's device is the CPU, so its bank is in host RAM and rank 1's is not.

The peak is ``benchmarks.common.peak_rss``: the kernel's high-water mark of the resident set (``VmHWM``), reset just
before the probe (``/proc/self/clear_refs``), above the resident set then, with glibc's mmap threshold fixed at
64 KiB so freed buffers leave the resident set; the probe's own peak, not start-up's. Each mode runs in fresh
processes.

    PYTHONPATH=. python benchmarks/retention_probe.py                       # 100 000 + 10 000 images, 768-d
    PYTHONPATH=. python benchmarks/retention_probe.py --train 20000 --test 2000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("before", "after")


def overrides(args: argparse.Namespace, out: Path) -> list[str]:
    per_train, per_test = args.train // args.classes, args.test // args.classes
    data = (
        f"data.retention.options={{n_classes: {args.classes}, n_per_class: {per_train}, n_test_per_class: {per_test}, "
    )
    return [f"out_dir={out}", "data.name=synthetic", "scenario.n_tasks=1", "data.image_size=8",
            "data.options={n_classes: 2, n_per_class: 2, n_test_per_class: 1, image_size: 8}",
            "model.backbone=vit_nano_patch4_32", "model.pretrained=false",
            f"model.kwargs={{depth: 0, embed_dim: {args.dim}, num_heads: 1, img_size: 8}}", "method.name=finetune",
            "data.retention.name=synthetic", data + "image_size: 8, seed: 7}",
            f"train.eval_batch_size={args.batch}", "train.num_workers=0", "train.threads=1", "train.device=cpu",
            "train.progress=false", "train.tensorboard=false"]  # fmt: skip


def worker(mode: str, spec: dict) -> None:
    """One process of one mode: build the method, reset the high-water mark, probe, report (rank 0 writes)."""
    import torch

    from benchmarks.common import peak_rss
    from retain import distributed
    from retain.config import load_config
    from retain.engine import RunContext, build_run
    from retain.engine.build import retention_datasets
    from retain.engine.evaluation import retention_accuracy
    from retain.features import weighted_knn_accuracy

    with distributed.session("cpu"):
        cfg = load_config(None, spec["over"])
        torch.set_num_threads(1)
        scenario, method = build_run(cfg, torch.device("cpu"))
        method.bind(RunContext(cfg.train, torch.device("cpu")))
        sets = retention_datasets(cfg, scenario.tasks[0].test.base)
        k = cfg.data.retention.k
        gc.collect()
        distributed.barrier()
        out: dict = {}

        def probe() -> None:
            start = time.perf_counter()
            if mode == "before":
                (f_train, y_train), (f_test, y_test) = (_old_extract(method, s) for s in sets)
                out["acc"] = weighted_knn_accuracy(f_train, y_train, f_test, y_test, k=k)
            else:
                out["acc"] = retention_accuracy(method, sets, k=k)
            out["seconds"] = time.perf_counter() - start

        peak = peak_rss(probe)
        if peak is None:
            raise SystemExit("cannot measure the resident set here (needs Linux /proc/self/clear_refs)")
        row = torch.tensor([peak / 1024], dtype=torch.float64)
        rows = distributed.gather_rows(row[None])  # (processes, 1): KiB
        if distributed.is_main():
            Path(spec["result"]).write_text(json.dumps(out | {"rows": rows.tolist()}))


def _old_extract(method, data) -> tuple:
    """The feature pass as it was (``Method.extract_features`` before item 6): every batch's features as
    ``forward`` returns them (on the CPU a view of the ViT's tokens, ``x[:, 0]``, which keeps them all), gathered
    to every process."""
    import torch

    from retain import distributed

    method.model.eval()
    feats, labels = [], []
    with torch.no_grad():
        for x, y in method.loader(data):
            feats.append(method.features(x.to(method.device)).float().cpu())  # (B, D)
            labels.append(y)
    feats, labels = (torch.cat(p) if p else None for p in (feats, labels))  # (N_r, D), (N_r,); None: no batch
    return distributed.gather_rows(feats), distributed.gather_rows(labels)


def launch(args: argparse.Namespace, mode: str, out: Path) -> dict:
    spec = {"over": overrides(args, out), "result": str(out / f"{mode}.json")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
           __file__, "--worker", mode, "--spec", json.dumps(spec)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(Path(spec["result"]).read_text())


def report(args: argparse.Namespace, results: dict[str, dict]) -> str:
    bank = args.train // args.classes * args.classes * args.dim * 4 / 2**20
    lines = [f"retention probe, {args.processes} gloo processes x 1 thread: {args.train} + {args.test} images, "
             f"{args.dim}-d features (the bank: {bank:.0f} MiB float32), k-NN chunk 1024",
             f"{'':28}{'before':>12}{'after':>12}"]  # fmt: skip
    for r in range(args.processes):
        peaks = [results[m]["rows"][r][0] / 1024 for m in MODES]
        lines.append(f"{f'rank {r} peak above start (MiB)':28}" + "".join(f"{p:12.0f}" for p in peaks))
    total = [sum(row[0] for row in results[m]["rows"]) / 1024 for m in MODES]
    lines.append(f"{'all ranks (MiB)':28}" + "".join(f"{t:12.0f}" for t in total))
    lines.append(f"{'seconds (rank 0)':28}" + "".join(f"{results[m]['seconds']:12.1f}" for m in MODES))
    lines.append(f"{'k-NN accuracy (%)':28}" + "".join(f"{results[m]['acc']:12.4f}" for m in MODES))
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=100_000, help="retention train images (the k-NN bank)")
    p.add_argument("--test", type=int, default=10_000, help="retention test images (the queries)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--dim", type=int, default=768, help="feature width (ViT-B: 768)")
    p.add_argument("--batch", type=int, default=500, help="train.eval_batch_size")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args.worker, json.loads(args.spec))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: launch(args, m, Path(tmp)) for m in MODES}
    print(report(args, results))
    if results["before"]["acc"] != results["after"]["acc"]:
        print("note: the accuracies differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
