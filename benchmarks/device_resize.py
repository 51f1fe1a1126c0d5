"""Device-side resize (issue #20 item 4): the 224-px CIFAR presets' CPU transforms against their native-resolution
half (``retain.data.device_resize``), side by side in one run.

Per transform: the per-sample CPU cost of the full CPU path (crop, resize to 224, flip, scale, normalise) against the
native path (crop and flip at 32 px into a uint8 canvas), interleaved in rotating rounds (median img/s, median
per-round ratio); the bytes per image that cross host -> device (float32 3 x 224 x 224 against the canvas plus its
crop size and target); the batched device-side resample per image (``DeviceImages.to``: on CUDA when available,
with ``torch.cuda.synchronize``, next to the CPU path's pinned float32 copy; else on the CPU); and the equivalence
on the shipped real CIFAR-10 images: each sample seeded alike on both paths, max and mean |device - CPU| per pixel
before normalisation (the CPU path rounds to uint8; the device path does not).

    python -m benchmarks.device_resize            # 500 images, batch 128 -> benchmarks/results/device_resize.json
    python -m benchmarks.device_resize --small    # 100 images, batch 32, fewer rounds
    python -m benchmarks.device_resize --device cpu --out /tmp/device_resize.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from benchmarks.common import machine_info, measure, parse_sized, time_interleaved  # noqa: E402
from retain.data.device_resize import build_native_transform, collate_native  # noqa: E402
from retain.data.samples import load_sample  # noqa: E402
from retain.data.transforms import build_transform  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"images": 100, "timing_images": 50, "batch": 32, "rounds": 5}
HALF, IMAGENET = ((0.5,) * 3, (0.5,) * 3), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TRAIN, TEST, BICUBIC = {"train": True}, {"train": False}, {"interpolation": "bicubic"}
RRC = TRAIN | {"augment": "rrc"}
TRANSFORMS = {  # name: (presets, build_transform arguments, normalisation)
    "rrc (0.08, 1) bilinear": ("peft_vit/cifar100_* train", RRC | {"rrc_scale": (0.08, 1.0)}, HALF),
    "rrc (0.05, 1) bicubic": ("ln_tuning/cifar100* train", RRC | {"rrc_scale": (0.05, 1.0)} | BICUBIC, None),
    "pad_rrc bilinear": ("Pad(4) + RandomResizedCrop at 32 px, upsampled", TRAIN | {"augment": "pad_rrc"}, HALF),
    "none + crop bilinear": ("confit/cifar100 train+test", TEST | {"resize": "crop"}, IMAGENET),
    "none + direct bilinear": ("peft_vit/cifar100_* test", TEST | {"resize": "direct"}, HALF),
    "none + crop bicubic": ("ln_tuning/cifar100* test", TEST | {"resize": "crop"} | BICUBIC, None),
}  # fmt: skip


def _pair(kw: dict, size: int, norm: tuple | None):
    mean, std = norm if norm else (None, None)
    return build_transform(image_size=size, mean=mean, std=std, **kw), build_native_transform(
        image_size=size, mean=mean, std=std, **kw
    )


def equivalence(images: torch.Tensor, kw: dict, size: int, batch: int, device: torch.device) -> dict:
    """Sample i seeded with i on both paths; max / mean |device - CPU| over all pixels in [0, 1] units."""
    cpu, native = _pair(kw, size, None)
    worst, total, count, same_rng = 0.0, 0.0, 0, True
    for start in range(0, len(images), batch):
        refs, crops = [], []
        for i in range(start, min(start + batch, len(images))):
            torch.manual_seed(i)
            refs.append(cpu(images[i]))
            state = torch.get_rng_state()
            torch.manual_seed(i)
            crops.append(native(images[i]))
            same_rng &= torch.equal(state, torch.get_rng_state())
        diff = (collate_native(crops).to(device).cpu() - torch.stack(refs)).abs()  # (B, 3, S, S)
        worst, total, count = max(worst, diff.max().item()), total + diff.sum().item(), count + diff.numel()
    return {"max_abs_diff": worst, "mean_abs_diff": total / count, "same_rng_draws": same_rng}


def _load() -> float | None:
    """The 1-minute load average (other jobs on the machine move the timings)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_timing(images: torch.Tensor, kw: dict, norm: tuple | None, size: int, batch: int, device: torch.device,
                  rounds: int, warmup: int) -> dict:  # fmt: skip
    """Seconds per image of the batched resample (``DeviceImages.to``); on CUDA also the CPU path's float32 copy."""
    cpu, native = _pair(kw, size, norm)
    batch_images = images[torch.arange(batch) % len(images)]
    x = collate_native([native(im) for im in batch_images])
    ref = torch.stack([cpu(im) for im in batch_images])  # (B, 3, S, S)
    fns = {"device path": lambda: (x.to(device, non_blocking=True), _sync(device))}
    if device.type == "cuda":
        x, ref = x.pin_memory(), ref.pin_memory()
        fns["cpu path copy"] = lambda: (ref.to(device, non_blocking=True), _sync(device))
    times = time_interleaved(fns, rounds, warmup)
    out = {"resample_s_per_img": statistics.median(times["device path"]) / batch,
           "bytes_per_img_float32": ref[0].numel() * ref.element_size(),
           "bytes_per_img_native": x.nbytes / batch}  # fmt: skip
    if "cpu path copy" in times:
        out["float32_copy_s_per_img"] = statistics.median(times["cpu path copy"]) / batch
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500, help="real CIFAR-10 images for the equivalence (<= 500)")
    p.add_argument("--timing-images", type=int, default=100, help="images per timed call of a CPU transform")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="batch of the device resample")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    p.add_argument("--device", default=None, help="device of the resample: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON file (default $OUT/device_resize.json, else benchmarks/results/)")
    return parse_sized(p, argv, SMALL)


def collect(argv: list[str] | None = None) -> dict:
    """Per transform: CPU img/s of both paths and their ratio, bytes per image, resample time, equivalence."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    load = {"load_before": _load()}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = torch.from_numpy(load_sample()["train_images"]).permute(0, 3, 1, 2).contiguous()[: args.images]
    timed = images[: args.timing_images]  # (n, 3, 32, 32) uint8

    def per_sample(tf):
        return lambda: [tf(im) for im in timed]

    pairs = {name: _pair(kw, args.image_size, norm) for name, (_, kw, norm) in TRANSFORMS.items()}
    ratios = measure({n: {"cpu": per_sample(c), "native": per_sample(nt)} for n, (c, nt) in pairs.items()},
                     args.rounds, args.warmup)  # fmt: skip
    rows = []
    for r in ratios:
        presets, kw, norm = TRANSFORMS[r.case]
        row = {"transform": r.case, "presets": presets, "cpu_img_s": len(timed) / r.ref_s,
               "native_img_s": len(timed) / r.ours_s, "ratio": r.ratio}  # fmt: skip
        row |= device_timing(images, kw, norm, args.image_size, args.batch, device, args.rounds, args.warmup)
        row |= equivalence(images, kw, args.image_size, args.batch, device)
        rows.append(row)
    settings = {k: getattr(args, k) for k in ("images", "timing_images", "image_size", "batch", "rounds", "warmup",
                                              "threads")} | {"device": str(device)}  # fmt: skip
    load["load_after"] = _load()
    ratio = "native-path img/s / CPU-path img/s (per-sample CPU transform), median of per-round ratios"
    return {"settings": settings, "machine": machine_info() | load, "rows": rows, "ratio": ratio}


def table(res: dict) -> str:
    """The rows as a markdown table."""
    dev = res["settings"]["device"]
    head = ["transform", "presets", "CPU path img/s", "native img/s", "ratio", "bytes/img float32",
            "bytes/img native", f"resample ms/img ({dev})", "max diff", "mean diff", "same draws"]  # fmt: skip
    cuda = any("float32_copy_s_per_img" in r for r in res["rows"])
    if cuda:
        head.insert(8, "float32 copy ms/img")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["transform"], r["presets"], f"{r['cpu_img_s']:,.0f}", f"{r['native_img_s']:,.0f}",
                 f"{r['ratio']:.1f}x", f"{r['bytes_per_img_float32']:,}", f"{r['bytes_per_img_native']:,.0f}",
                 f"{1e3 * r['resample_s_per_img']:.3f}", f"{255 * r['max_abs_diff']:.3f}/255",
                 f"{255 * r['mean_abs_diff']:.3f}/255", "yes" if r["same_rng_draws"] else "NO"]  # fmt: skip
        if cuda:
            cells.insert(8, f"{1e3 * r['float32_copy_s_per_img']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    res = collect(argv)
    res["command"] = " ".join(["python -m benchmarks.device_resize", *(sys.argv[1:] if argv is None else argv)])
    res["seconds"] = round(time.perf_counter() - start, 1)
    s = res["settings"]
    print(f"{s['images']} real CIFAR-10 images at {s['image_size']} px, resample batch {s['batch']} on {s['device']}, "
          f"{s['threads']} thread(s), {s['rounds']} rounds, torch {torch.__version__}\n")  # fmt: skip
    print(table(res))
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out = out / "device_resize.json" if out.suffix != ".json" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {out} ({res['seconds']:.0f} s)")
    return 0 if all(r["same_rng_draws"] for r in res["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
