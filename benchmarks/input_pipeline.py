"""Input pipeline: img/s of retain's training loader per paper preset's train transform, against plain torchvision
(issue #20 item 5), on generated images of the real sizes and formats, on the CPU:

    python -m benchmarks.input_pipeline                 # every distinct train transform, N = 0, 1, 2 workers
    python -m benchmarks.input_pipeline --quick         # ~20 s smoke run
    python -m benchmarks.input_pipeline --presets confit ln_tuning/imagenet_r --workers 0 1 2 4

The presets of the paper families (ln_tuning, pad, peft_vit, confit) are loaded with ``retain.config`` and their
train transform built as the engine builds it (``build_transforms`` with the backbone's timm data config); presets
with the same transform over the same kind of source images share one row (the representative is the base preset,
the one without ``defaults:``).

Sources, written into a temporary folder deleted afterwards: JPEG files (quality 90; smooth random colour fields,
mid-frequency texture and noise, so file sizes and decode times are those of photos) in an ImageFolder layout at
ImageNet-R-, CUB-, Flowers- and Caltech-like sizes; 32-px uint8 arrays (N, 32, 32, 3) for CIFAR-100 and ImageNet32.

Per row and number of workers N, side by side (alternating order over ``--rounds``):
- retain: ``RunContext(TrainConfig(num_workers=N), cpu).train_loader(ImageDataset(...), batch, generator)``;
- plain: ``torchvision.datasets.ImageFolder`` (``PILToTensor`` then the same transform) or a plain Dataset indexing
  the uint8 array, in ``DataLoader(shuffle=True, num_workers=N)``; the same batch size and files.
Batches of 32 (``--batch 0``: each preset's; the cost per image hardly depends on it). One batch per worker is
loaded untimed (worker start-up, and every worker's first batch), then whole numbers of batches per worker are
timed, at least ``--batches`` and ``--seconds``: img/s by the wall clock, and images per CPU-second of this process
plus the workers (``/proc``; much less moved by other jobs on the machine than the wall clock). img/s at N = 1 is
the per-worker speed; N = 0 loads in this process (``--threads``, default 1 thread, so it is one core too).
Workers needed = ceil(target img/s / per-worker img/s), for a ViT-B/16 at 1,500 img/s and a ResNet-18 at 3,000
img/s: it assumes the loader scales linearly over cores at THIS machine's per-core speed (the CPU model is printed).
JPEGs are read from the page cache (written just before). The JSON also holds what handing a batch over from a
worker costs here (a stack into fresh shared memory against a plain stack), the one cost a worker has that loading
in-process has not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageChops
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from benchmarks.common import machine_info  # noqa: E402
from benchmarks.run import machine_slug  # noqa: E402
from retain.config import RunConfig, TrainConfig, load_config, load_yaml, preset_names, resolve_preset  # noqa: E402
from retain.data import ImageDataset  # noqa: E402
from retain.engine.build import build_transforms, probe_backbone  # noqa: E402
from retain.engine.context import RunContext  # noqa: E402
from retain.models import data_config  # noqa: E402

FAMILIES = ("ln_tuning", "pad", "peft_vit", "confit")  # the paper presets
TARGETS = {"ViT-B/16": 1500, "ResNet-18": 3000}  # img/s a training step consumes (issue #20)
N_CLASSES = 8  # class folders per JPEG source
ARRAY_IMAGES = 16  # 32-px images per JPEG file asked for (--images): in memory, and fast to load
QUICK = {"batch": 16, "batches": 1, "seconds": 0.0, "rounds": 1, "workers": [0, 1], "images": 0}


@dataclass(frozen=True)
class Source:
    """Generated source images: JPEG files with a short and a long side drawn uniformly in px ranges (long side
    horizontal with probability 3/4), or a uint8 array of 32 x 32 images."""

    label: str
    short: tuple[int, int] = (32, 32)
    long: tuple[int, int] = (32, 32)
    jpeg: bool = True


SOURCES = {
    "imagenet_r": Source("JPEG, ImageNet-R-like", short=(400, 500), long=(500, 700)),
    "cub200": Source("JPEG, CUB-like ~500x375", short=(333, 400), long=(500, 500)),
    "flowers102": Source("JPEG, Flowers-like 500x600+", short=(500, 500), long=(550, 750)),
    "caltech101": Source("JPEG, Caltech-like ~300x200", short=(180, 260), long=(300, 300)),
    "array32": Source("uint8 array (N, 32, 32, 3)", jpeg=False),
}


def source_of(preset: str, data_name: str) -> str:
    """The key in SOURCES of the images ``preset`` reads (``data.name``, and the preset's name for imagefolder)."""
    if data_name in ("cifar10", "cifar100", "imagenet32"):
        return "array32"
    if data_name == "caltech101":
        return "caltech101"
    if data_name == "imagefolder":
        for key in ("imagenet_r", "cub200", "flowers102"):
            if key in preset.split("/")[-1]:
                return key
    raise ValueError(f"{preset}: no generated source for data.name={data_name}; add one to SOURCES / source_of")


# ---- presets -> rows ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """Presets sharing one train transform over one kind of source images."""

    presets: list[str]
    representative: str
    source: str
    batch: int
    transform: Callable

    def label(self) -> str:
        names = sorted(self.presets)
        if len(names) > 2:
            return f"{os.path.commonprefix(names)}* ({len(names)})"
        return ", ".join(names)


def _expand(names: list[str]) -> list[str]:
    """Preset names, a family name standing for all its presets."""
    every = preset_names()
    out: list[str] = []
    for name in names:
        family = [p for p in every if p.split("/")[0] == name]
        out += family or [name]
    return list(dict.fromkeys(out))


def _data_config(cfg: RunConfig, cache: dict) -> dict:
    """The backbone's timm data config, from a model built on the meta device (no weights), once per backbone."""
    key = (cfg.model.backbone, json.dumps(cfg.model.kwargs, sort_keys=True))
    if key not in cache:
        try:
            with torch.device("meta"):
                cache[key] = data_config(probe_backbone(cfg))
        except Exception:  # noqa: BLE001 - a backbone that cannot be built on meta: at random init on the CPU
            cache[key] = data_config(probe_backbone(cfg))
    return cache[key]


def _is_base(preset: str) -> bool:
    tree = load_yaml(resolve_preset(preset).read_text()) or {}
    return "defaults" not in tree


def build_rows(names: list[str]) -> list[Row]:
    """One row per distinct (train transform, source) among the presets ``names`` (families allowed)."""
    groups: dict[tuple[str, str], list[tuple[str, RunConfig, Callable]]] = {}
    cache: dict = {}
    for preset in _expand(names):
        cfg = load_config(preset)
        train_tf, _ = build_transforms(cfg, _data_config(cfg, cache))
        key = (source_of(preset, cfg.data.name), repr(train_tf))
        groups.setdefault(key, []).append((preset, cfg, train_tf))
    rows = []
    for (source, _), members in groups.items():
        preset, cfg, tf = next((m for m in members if _is_base(m[0])), members[0])
        rows.append(Row([m[0] for m in members], preset, source, cfg.train.batch_size, tf))
    return sorted(rows, key=lambda r: r.representative)


# ---- generated data -------------------------------------------------------------------------------------------------
def _picture(rng: np.random.Generator, w: int, h: int, noise: Image.Image) -> Image.Image:
    """A photo-like RGB image: a smooth random colour field, mid-frequency texture and pixel noise."""
    coarse = rng.integers(0, 256, (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    fine = rng.integers(0, 256, (h // 12 + 2, w // 12 + 2, 3), dtype=np.uint8)
    img = Image.blend(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                      Image.fromarray(fine).resize((w, h), Image.Resampling.BICUBIC), 0.3)  # fmt: skip
    x, y = int(rng.integers(0, noise.width - w + 1)), int(rng.integers(0, noise.height - h + 1))
    return ImageChops.add(img, noise.crop((x, y, x + w, y + h)), offset=-10)


def write_jpegs(folder: Path, source: Source, n: int, seed: int = 0) -> dict:
    """``n`` JPEG files (quality 90) in ``folder/<class>/``; their paths, targets and sizes."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(np.clip(rng.normal(10, 5, (1024, 1024, 3)), 0, 255).astype(np.uint8))
    paths, targets, nbytes, pixels = [], [], 0, 0
    for i in range(n):
        short = int(rng.integers(source.short[0], source.short[1] + 1))
        long = max(short, int(rng.integers(source.long[0], source.long[1] + 1)))
        w, h = (long, short) if rng.random() < 0.75 else (short, long)
        path = folder / f"c{i % N_CLASSES}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        _picture(rng, w, h, noise).save(path, "JPEG", quality=90)
        paths.append(str(path))
        targets.append(i % N_CLASSES)
        nbytes, pixels = nbytes + path.stat().st_size, pixels + w * h
    return {"root": str(folder), "paths": paths, "targets": np.array(targets), "n": n,
            "mean_kib": nbytes / n / 1024, "mean_megapixels": pixels / n / 1e6}  # fmt: skip


def make_array(n: int, seed: int = 0) -> dict:
    """``n`` 32-px uint8 images (N, 32, 32, 3), as CIFAR-100 and ImageNet32 are held in memory."""
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8).repeat(8, 1).repeat(8, 2).astype(np.int16)
    images = np.clip(smooth + rng.integers(-12, 13, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return {"images": images, "targets": np.arange(n) % N_CLASSES, "n": n}


# ---- the two loaders ------------------------------------------------------------------------------------------------
class PlainArray(Dataset):
    """The plain baseline over a uint8 array: index it, make a (3, H, W) view, apply the transform."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: Callable) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(torch.from_numpy(self.images[i]).permute(2, 0, 1)), int(self.targets[i])


def retain_loader(data: dict, tf: Callable, batch: int, workers: int) -> DataLoader:
    """retain's training loader over retain's ImageDataset, as the engine makes it."""
    classes = [f"c{i}" for i in range(N_CLASSES)]
    if "images" in data:
        ds = ImageDataset(data["targets"], classes, images=data["images"], transform=tf)
    else:
        ds = ImageDataset(data["targets"], classes, paths=data["paths"], transform=tf)
    ctx = RunContext(train=TrainConfig(num_workers=workers), device=torch.device("cpu"))
    return ctx.train_loader(ds, batch, torch.Generator().manual_seed(0))


def plain_loader(data: dict, tf: Callable, batch: int, workers: int) -> DataLoader:
    """torchvision's ImageFolder (or a plain array Dataset) with the same transform in a plain DataLoader."""
    if "images" in data:
        ds: Dataset = PlainArray(data["images"], data["targets"], tf)
    else:
        ds = ImageFolder(data["root"], transform=v2.Compose([v2.PILToTensor(), tf]))
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers)


def timed_batches(batches: int, workers: int) -> int:
    """``batches`` rounded up to a whole number of batches per worker."""
    per = max(workers, 1)
    return per * math.ceil(batches / per)


def images_needed(batch: int, batches: int, workers: list[int]) -> int:
    """Images for the untimed batches and ``batches`` timed ones at every number of workers."""
    return batch * max(max(n, 1) + timed_batches(batches, n) for n in workers)


def _cpu_seconds(pids: list[int]) -> float | None:
    """CPU seconds used so far by this process and the processes ``pids`` (Linux ``/proc``); None elsewhere."""
    total = time.process_time()
    try:
        for pid in pids:
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
    return total


def img_per_s(loader: DataLoader, workers: int, batches: int, seconds: float) -> dict:
    """img/s (wall clock) and images per CPU-second (this process + the workers) after one untimed batch per worker,
    over whole numbers of batches per worker: at least ``batches`` and ``seconds`` (or to the epoch's end); the
    image shape."""
    per = max(workers, 1)
    it = iter(loader)
    for _ in range(per):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]  # DataLoader's worker processes (private attribute)
    cpu, start = _cpu_seconds(pids), time.perf_counter()
    n, taken, mark, shape = 0, 0, None, None  # mark: (images, seconds, CPU seconds) at the last whole group
    for x, _ in it:
        n, taken, shape = n + len(x), taken + 1, tuple(x.shape[1:])
        if taken % per == 0:
            mark = (n, time.perf_counter() - start, _cpu_seconds(pids))
            if taken >= batches and mark[1] >= seconds:
                break
    del it, loader  # shuts its workers down (persistent ones too)
    if mark is None:
        raise RuntimeError(f"fewer than {2 * per} batches in an epoch; pass more --images or a smaller --batch")
    images, wall, cpu_end = mark
    cpu_img_s = images / (cpu_end - cpu) if cpu is not None and cpu_end is not None and cpu_end > cpu else None
    return {"img_s": images / wall, "cpu_img_s": cpu_img_s, "shape": shape}


def _median(values: list[float | None]) -> float | None:
    return None if None in values else statistics.median(values)


def measure(row: Row, data: dict, batch: int, workers: list[int], args: argparse.Namespace) -> list[dict]:
    """retain and plain at each number of workers, alternating which goes first; medians over rounds (ratios:
    median of the per-round ratios)."""
    loaders = {"retain": retain_loader, "plain": plain_loader}
    out = []
    for n in workers:
        runs: dict[str, list[dict]] = {k: [] for k in loaders}
        for r in range(args.rounds):
            for key in list(loaders)[:: 1 if r % 2 == 0 else -1]:
                runs[key].append(img_per_s(loaders[key](data, row.transform, batch, n), n, args.batches, args.seconds))
        ours, ref = runs["retain"], runs["plain"]
        if ours[0]["shape"] != ref[0]["shape"]:
            raise AssertionError(f"{row.representative}: retain images {ours[0]['shape']} != plain {ref[0]['shape']}")
        entry: dict = {"workers": n, "image_shape": list(ours[0]["shape"])}
        for metric in ("img_s", "cpu_img_s"):
            a, b = [x[metric] for x in ours], [x[metric] for x in ref]
            ratio = None if None in a + b else statistics.median(x / y for x, y in zip(a, b, strict=True))
            entry |= {f"retain_{metric}": _median(a), f"plain_{metric}": _median(b),
                      f"ratio_{metric}": ratio, f"retain_{metric}_rounds": a, f"plain_{metric}_rounds": b}  # fmt: skip
        out.append(entry)
    return out


def ipc_probe(batch: int = 32, size: int = 224, repeats: int = 5) -> dict:
    """ms to collate ``batch`` float32 (3, size, size) images as a worker does (into fresh shared memory) and as the
    training process does (a plain stack): the per-batch cost of handing images over from a worker, on this
    machine."""
    images = [torch.rand(3, size, size) for _ in range(batch)]

    def shared() -> None:
        torch.stack(images, out=torch.empty(batch, 3, size, size).share_memory_())

    times = {}
    for name, fn in (("plain_stack_ms", lambda: torch.stack(images)), ("shared_stack_ms", shared)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times[name] = 1e3 * (time.perf_counter() - start) / repeats
    return {"batch": batch, "image": [3, size, size], **times}


# ---- run ------------------------------------------------------------------------------------------------------------
def workers_needed(per_worker: float) -> dict[str, int]:
    return {f"{name} @{target}": math.ceil(target / per_worker) for name, target in TARGETS.items()}


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def collect(args: argparse.Namespace) -> dict:
    """Every row's measurements (the JSON results)."""
    start, load = time.perf_counter(), _load()
    rows = build_rows(args.presets)
    workers = sorted(set(args.workers) | {0, 1})
    results = []
    with tempfile.TemporaryDirectory(prefix="retain-input-pipeline-") as tmp:
        sources: dict[str, dict] = {}
        for row in rows:
            batch, spec = args.batch or row.batch, SOURCES[row.source]
            need = images_needed(batch, args.batches, workers)
            if row.source not in sources or sources[row.source]["n"] < need:
                n = max(need, args.images if spec.jpeg else ARRAY_IMAGES * args.images)
                folder = Path(tmp) / f"{row.source}_{n}"
                sources[row.source] = write_jpegs(folder, spec, n) if spec.jpeg else make_array(n)
            data = sources[row.source]
            print(f"[input_pipeline] {row.representative} ({row.label()}): batch {batch}, {data['n']} images",
                  file=sys.stderr, flush=True)  # fmt: skip
            by_workers = measure(row, data, batch, workers, args)
            at = {w["workers"]: w for w in by_workers}
            per_worker, per_cpu = at[1]["retain_img_s"], at[1]["retain_cpu_img_s"]
            results.append({
                "presets": sorted(row.presets), "label": row.label(), "representative": row.representative,
                "transform": [repr(t) for t in getattr(row.transform, "transforms", [row.transform])],
                "source": {"key": row.source, **asdict(spec), "images": data["n"],
                           **{k: data[k] for k in ("mean_kib", "mean_megapixels") if k in data}},
                "batch": batch, "by_workers": by_workers,
                "per_worker_img_s": per_worker, "in_process_img_s": at[0]["retain_img_s"],
                "plain_per_worker_img_s": at[1]["plain_img_s"], "plain_in_process_img_s": at[0]["plain_img_s"],
                "ratio_per_worker": at[1]["ratio_img_s"], "per_cpu_second_img_s": per_cpu,
                "workers_needed": workers_needed(per_worker),
                "workers_needed_by_cpu_time": workers_needed(per_cpu) if per_cpu else None,
            })  # fmt: skip
    settings = {k: getattr(args, k) for k in ("presets", "batch", "batches", "seconds", "rounds", "images", "threads",
                                            "quick")}  # fmt: skip
    return {"machine": machine_info() | {"load_before": load, "load_after": _load()}, "ipc": ipc_probe(),
            "settings": settings | {"workers": workers}, "targets_img_s": TARGETS,
            "assumption": "workers needed = ceil(target / per-worker img/s): linear scaling over cores at this "
                          "machine's per-core speed", "rows": results,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _source_text(row: dict) -> str:
    s = row["source"]
    if "mean_kib" not in s:
        return s["label"]
    return f"{s['label']}, {s['mean_megapixels']:.2f} MP, {s['mean_kib']:.0f} KiB avg"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def table(res: dict) -> str:
    """The markdown table of a results dict."""
    other = [n for n in res["settings"]["workers"] if n != 1]
    heads = ["preset(s)", "source images", "per worker img/s (retain, N=1)", "in-process img/s (retain, N=0)",
             "plain torchvision img/s (N=1)", f"ratio retain/plain N=1 ({', '.join(f'N={n}' for n in other)})",
             *(f"workers for {k} img/s" for k in (f"{n} @{t}" for n, t in TARGETS.items())),
             "img/s per CPU-second (retain, N=1)", "ratio by CPU time (N=1)"]  # fmt: skip
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in res["rows"]:
        at = {w["workers"]: w for w in r["by_workers"]}
        ratios = [f"{at[n]['ratio_img_s']:.2f}" for n in other]
        cells = [r["label"], _source_text(r), _num(r["per_worker_img_s"]), _num(r["in_process_img_s"]),
                 _num(r["plain_per_worker_img_s"]), f"{at[1]['ratio_img_s']:.2f} ({', '.join(ratios)})",
                 *(str(v) for v in r["workers_needed"].values()), _num(r["per_cpu_second_img_s"]),
                 "n/a" if at[1]["ratio_cpu_img_s"] is None else f"{at[1]['ratio_cpu_img_s']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=list(FAMILIES), help="presets or families (default: the paper's)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="numbers of workers (0 and 1 always)")
    p.add_argument("--batch", type=int, default=32, help="batch size (0: each preset's train.batch_size)")
    p.add_argument("--batches", type=int, default=2, help="timed batches at least (a multiple of N)")
    p.add_argument("--seconds", type=float, default=0.4, help="timed seconds at least per measurement")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each loader, alternating which goes first")
    p.add_argument("--images", type=int, default=256, help="JPEG files per source at least (more if the run needs)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (N=0 loads here)")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/ if set, else benchmarks/results/)")
    p.add_argument("--quick", action="store_true", help=f"smoke run (~20 s): {QUICK}")
    if p.parse_known_args(argv)[0].quick:
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        res = collect(args)
    finally:
        torch.set_num_threads(threads)
    m = res["machine"]
    loads = [x for x in (m["load_before"], m["load_after"]) if x is not None]
    load = f", load average {' -> '.join(f'{x:.2f}' for x in loads)}" if loads else ""
    print(f"CPU: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}), torch {m['torch']}, {args.threads} "
          f"thread(s) in-process{load}")  # fmt: skip
    print(table(res))
    print(f"\nWorkers needed = ceil(target / per-worker img/s at N=1): assumes the loader scales linearly over cores "
          f"at the per-core speed of THIS machine ({m['cpu']}).")  # fmt: skip
    ipc = res["ipc"]
    print(f"Handing a batch of {ipc['batch']} float32 {ipc['image'][1]}-px images over through fresh shared memory "
          f"(what a worker does): {ipc['shared_stack_ms']:.1f} ms; a plain stack in-process: "
          f"{ipc['plain_stack_ms']:.1f} ms.")  # fmt: skip
    busy = m["load_before"] is not None and m["load_before"] > 0.5 * (m["cores"] or 1)
    if busy:  # (the load after includes this run's own workers)
        print(f"Warning: the machine was busy before the run (load average {m['load_before']:.1f} on {m['cores']} "
              "cores); wall-clock img/s are low, img/s per CPU-second (this process + workers) less so.")  # fmt: skip
    print("Rows sharing a transform:")
    for r in res["rows"]:
        print(f"- {r['representative']}: {', '.join(r['presets'])}")
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out = out if out.suffix == ".json" else out / f"input_pipeline_{machine_slug(m)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
