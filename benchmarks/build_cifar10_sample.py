"""Rebuild the CIFAR-10 sample shipped in the package (``retain/data/cifar10_sample.{npz,json}``).

50 train and 50 test images per class, drawn with a fixed seed from the project's CIFAR-10 JPEG copy; the demo's
retention probe of the shipped CIFAR-10 backbones (``data.retention.name=cifar10_sample``). A rebuild from the same
archive gave the same file (the card's ``sha256``); ``content_sha256`` hashes the arrays alone (a JPEG decoder of
another version may change a few pixel values).

    python benchmarks/build_cifar10_sample.py --root ../shared/data/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from retain.data.samples import CIFAR10_SAMPLE, build_cifar10_sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="CIFAR-10: the JPEG .tar.gz, train/+test/ folders or pickles")
    p.add_argument("--out", default=str(CIFAR10_SAMPLE), help=f"npz to write (default {CIFAR10_SAMPLE})")
    p.add_argument("--per-class", type=int, default=50, help="images per class and split (default 50)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build_cifar10_sample(args.root, args.out, args.per_class, args.seed)
    card = json.loads(path.with_suffix(".json").read_text())
    print(f"wrote {path} ({card['bytes']:,} bytes, sha256 {card['sha256']}) and its card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
