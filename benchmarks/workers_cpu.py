"""Dataloader workers on a CPU-only machine: the wall time of one 224-px ViT-Ti/16 run at 0, 1 and 2 workers.

On a CPU the training process's own threads use every core, so a worker decoding and augmenting competes with them
instead of running beside an idle GPU. This measures whether workers still pay there, which sets what
``train.num_workers: auto`` picks on a CPU device (``retain.engine.loading.auto_workers``).

Also the start-up of 1, 2 and 4 forked workers (first batch after ``iter()``), the figure behind
``WORKER_START_S``: an epoch that loads faster than that in the training process is loaded there.

Data: generated JPEGs in an ImageFolder layout at ImageNet-R-like sizes (about 500 x 400), RandomResizedCrop(224) +
flip, ImageNet normalisation; model ``vit_tiny_patch16_224`` at random init (nothing downloaded), fine-tuning, one
task of 4 classes, SGD. Every variant runs once per round in a rotated order (``benchmarks.common``); the ratio is
the median per-round ratio of wall times, t(0 workers) / t(N workers) (above 1: workers are faster).

    python -m benchmarks.workers_cpu            # ~2 min on 2 cores
    python -m benchmarks.workers_cpu --quick    # a few seconds: 64 px, 2 blocks, 16 images (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine_info, median_ratio, time_interleaved
from retain.config import load_config
from retain.engine import run

__all__ = ["main", "write_jpegs"]


def write_jpegs(root: Path, classes: int, per_class: int, size: tuple[int, int], seed: int = 0) -> None:
    """``root/{train,test}/c<k>/<i>.jpg``: smooth random colour fields with noise (JPEG sizes of real photos)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for split, n in (("train", per_class), ("test", max(1, per_class // 4))):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
                field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
                noise = rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
                image = np.clip(field + noise, 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.jpg", quality=90)


def startup_seconds(workers: int, repeats: int = 5) -> float:
    """Median seconds from ``iter(loader)`` to the first batch of a trivial in-memory dataset with ``workers``
    forked workers, minus the same in the training process: what starting workers costs (``WORKER_START_S``)."""
    data = torch.utils.data.TensorDataset(torch.zeros(64, 3, 32, 32))

    def first(n: int) -> float:
        with warnings.catch_warnings():  # more workers than this machine's CPUs: what the figure is about
            warnings.simplefilter("ignore")
            loader = torch.utils.data.DataLoader(data, batch_size=8, num_workers=n)
            started = time.perf_counter()
            next(iter(loader))
            return time.perf_counter() - started

    return statistics.median(first(workers) - first(0) for _ in range(repeats))


def _overrides(root: Path, out: Path, workers: int, quick: bool, name: str) -> list[str]:
    size = 64 if quick else 224
    model = f"{{depth: 2, img_size: {size}}}" if quick else "{}"
    return [
        "data.name=imagefolder", f"data.root={root}", f"data.image_size={size}", "data.augment=rrc",
        "data.normalize=imagenet", "scenario.n_tasks=1", "scenario.order_seed=null",
        "model.backbone=vit_tiny_patch16_224", "model.pretrained=false", f"model.kwargs={model}",
        "method.name=finetune", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=32",
        f"train.num_workers={workers}", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
        "run.checkpoint_every=off", f"out_dir={out}", f"name={name}",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=24, help="training images per class (4 classes)")
    parser.add_argument("--quick", action="store_true", help="1 round, 4 images a class, 2-block ViT-Ti at 64 px")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/workers_cpu.json"))
    args = parser.parse_args(argv)
    rounds, per_class = (1, 4) if args.quick else (args.rounds, args.per_class)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "runs"
        write_jpegs(root, 4, per_class, (500, 400))
        calls = iter(range(10**6))  # a fresh run directory per call

        def one(workers: int) -> None:
            over = _overrides(root, out, workers, args.quick, f"run{next(calls)}")
            run(load_config(None, over), log=lambda *_: None)

        fns = {w: (lambda w=w: one(w)) for w in args.workers}
        times = time_interleaved(fns, rounds=rounds, warmup=1)
    base = args.workers[0]
    rows = [{"workers": w, "seconds": statistics.median(times[w]), "ratio": median_ratio(times[base], times[w])}
            for w in args.workers]  # fmt: skip
    print(f"| workers | wall s (median of {rounds}) | t({base} workers) / t(workers) |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['seconds']:.1f} | {r['ratio']:.2f} |")
    startup = {w: startup_seconds(w) for w in (1, 2, 4)}
    print("worker start-up (first batch after iter(), minus in-process): "
          + ", ".join(f"{w} worker(s) {s:.2f} s" for w, s in startup.items()))  # fmt: skip
    result = {"machine": machine_info(), "torch_threads": torch.get_num_threads(), "rounds": rounds,
              "train_images": 4 * per_class, "quick": args.quick, "rows": rows, "startup_s": startup,
              "seconds": time.perf_counter() - started}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
