"""LN tuning's query cache: per-batch cost of its key, old and new, against the frozen query forward a hit saves.

- old key: the batch copied to the host, then blake2b over each image's bytes (``retain`` before issue #25 item 8);
- new key: exact integer projections of each image's 16-bit words, computed where the batch lives, (B, k) numbers
  to the host (``retain.models.query.image_keys``, projections already built: they are made once per shape);
- forward: the frozen pre-trained ViT's CLS token after its final norm in float32, what a cache hit saves.

Each round times the three side by side in a rotating order (``benchmarks.common.time_interleaved``; a key runs
``--key-reps`` times in a row and its time is divided by that); the script prints the median times per batch and the
median per-round ratios, for the project's tiny ViT at 32 px and a ViT-B/16-shaped model at 224 px (random weights:
nothing is downloaded).

    python benchmarks/ln_query_cache.py                             # batch 64, 1 thread, GPU if there is one
    python benchmarks/ln_query_cache.py --device cpu --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from benchmarks.common import machine_info, median_ratio, time_interleaved
from retain.models import create_backbone
from retain.models.query import image_keys

MODELS = {
    "vit_tiny_patch4_32 (32 px)": lambda: create_backbone("vit_tiny_patch4_32", pretrained=False),
    "vit_base_patch16_224 (224 px)": lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
}


def old_key(x: torch.Tensor) -> list[bytes]:
    """The previous key: host copy, then a 128-bit blake2b of each image's bytes."""
    raw = x.detach().cpu().contiguous().flatten(1).view(torch.uint8).numpy()  # (B, bytes)
    head = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    return [hashlib.blake2b(head + row.tobytes(), digest_size=16).digest() for row in raw]


def build_case(name: str, batch: int, device: torch.device, key_reps: int) -> tuple[dict[str, Callable], dict]:
    """The three calls on one fixed batch (each key ``key_reps`` times), and facts about the projections."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device).eval()
    x = torch.rand(batch, 3, *model.patch_embed.img_size, device=device)  # (B, 3, H, W)
    weights: dict = {}
    start = time.perf_counter()
    image_keys(x, weights)  # builds the projections once (per image shape and device)
    build_s = time.perf_counter() - start
    (w,) = weights.values()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @torch.no_grad()
    def forward() -> None:
        with torch.autocast(device.type, enabled=False):
            model.forward_features(x)[:, 0]  # (B, D)
        sync()

    def repeated(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(key_reps):
                fn()

        return run

    fns = {"old key": repeated(lambda: old_key(x)), "new key": repeated(lambda: image_keys(x, weights)),
           "forward": forward}  # fmt: skip
    return fns, {"projections": tuple(w.shape), "projection_mb": w.numel() * 8 / 2**20, "build_s": build_s}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--key-reps", type=int, default=20, help="key calls per round (times are per call)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info()
    gpu = f", {info['gpu']}" if info["gpu"] and device.type == "cuda" else ""
    print(f"batch {args.batch}, device {device}, {args.threads} thread(s), {args.rounds} rounds, torch "
          f"{info['torch']}, timm {timm.__version__}, {info['cpu']}{gpu}")  # fmt: skip
    for name in args.models:
        fns, facts = build_case(name, args.batch, device, args.key_reps)
        t = time_interleaved(fns, args.rounds, args.warmup)
        t = {k: [s / (1 if k == "forward" else args.key_reps) for s in v] for k, v in t.items()}  # per call
        ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
        print(f"{name}: old key {ms['old key']:.2f} ms | new key {ms['new key']:.2f} ms | forward "
              f"{ms['forward']:.1f} ms per batch")  # fmt: skip
        print(f"  old key / new key {median_ratio(t['old key'], t['new key']):.1f}x | forward / old key "
              f"{median_ratio(t['forward'], t['old key']):.1f}x | forward / new key "
              f"{median_ratio(t['forward'], t['new key']):.1f}x")  # fmt: skip
        print(f"  projections {facts['projections']} float64, {facts['projection_mb']:.2f} MB, built once in "
              f"{1e3 * facts['build_s']:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
