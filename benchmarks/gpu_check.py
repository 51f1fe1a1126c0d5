"""The GPU check: what only a GPU shows, in one short run (a few minutes on one CUDA GPU), on synthetic data at the
paper presets' real sizes (random weights: nothing is downloaded):

    python -m benchmarks.gpu_check                          # on a CUDA machine -> table + $OUT/gpu_check.json
    python -m benchmarks.gpu_check --tiny --device cpu      # the same code on two tiny models, on the CPU (tested)

Per model (ViT-B/16 and ViT-Ti/16 at 224 px, PAD's early-conv ViT at 32 px, ResNet-18 at 224 px; a linear head):
- train img/s and peak device memory in fp32 (TF32 off), fp32 with TF32 matmuls and convolutions (``train.tf32``),
  bf16 autocast and bf16 + ``torch.compile`` (compile time apart; both with TF32 on, as a run by default);
- loader-fed vs in-memory img/s: bf16 steps fed by the engine's training loader over ``ImageDataset`` of 32-px uint8
  images through the CIFAR-at-224 presets' train transform (RandomResizedCrop + flip, normalise) with N workers
  (default: what ``train.num_workers=auto`` picks) and pinned memory, on the CPU and with ``data.device_resize``,
  against the same steps on a batch already on the device (ratio < 1: the input pipeline is the bottleneck);
- fp32 vs bf16 loss after 20 identical SGD steps (relative difference).
Then through the engine on the device: a run SIGKILLed inside an epoch and resumed, with 2 dataloader workers and
augmentation, against the uninterrupted run (identical weights?), and one short run of every registered method, with
the precision a run used (metrics.json "precision": autocast, TF32 on or off), a 4-task run with ``train.compile``
(graphs compiled, torch giving up or not, accuracy against uncompiled) and the host-device syncs of a run with
``train.sync_every`` 1 and 10. With 2 or more CUDA devices: ConFiT on
2 processes (NCCL; its BatchNorm becomes SyncBatchNorm) against 1 process, fp32: weights, BN statistics and Xconv
trackers equal up to float noise (unsynchronised BN would leave rank 0's half-batch statistics); with fewer, one line
says what it would check.

Without CUDA and without ``--device`` it checks its own plan (every model builds on the meta device, every method's
run config parses), says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from retain.config import TrainConfig, load_config  # noqa: E402
from retain.data import ImageDataset, build_transform  # noqa: E402
from retain.data.device_resize import build_native_transform  # noqa: E402
from retain.engine.build import tf32_mode  # noqa: E402
from retain.engine.context import RunContext  # noqa: E402
from retain.methods import method_names  # noqa: E402
from retain.models import create_backbone  # noqa: E402
from retain.models.continual import ContinualModel  # noqa: E402

MODES = ("fp32", "tf32", "bf16", "bf16+compile")
N_CLASSES = 100


@dataclass(frozen=True)
class Model:
    label: str
    backbone: str
    size: int  # input side, px
    batch: int  # the preset's batch
    kwargs: dict = field(default_factory=dict)


MODELS = (
    Model("ViT-B/16", "vit_base_patch16_224", 224, 128),  # peft_vit/*, ln_tuning/*
    Model("ViT-Ti/16", "vit_tiny_patch16_224", 224, 96),  # pad/cifar100_*
    Model("early-conv ViT", "early_conv_vit", 32, 1024),  # pad/imagenet32_*
    Model("ResNet-18", "resnet18", 224, 32),  # confit/*
)
TINY = (
    Model("tiny ViT", "vit_nano_patch4_32", 16, 8, {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 16}),
    Model("tiny ResNet", "cifar_resnet20", 8, 8),
)


# ---- one model ------------------------------------------------------------------------------------------------------
def classifier(model: Model) -> ContinualModel:
    """The model's backbone (random weights) with one linear head."""
    backbone = create_backbone(model.backbone, pretrained=False, **model.kwargs)
    return ContinualModel(backbone, nn.Linear(backbone.num_features, N_CLASSES))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _stepper(model: Model, device: torch.device, mode: str) -> tuple[nn.Module, Callable]:
    """A fresh seeded classifier and ``step(x, y) -> loss`` (SGD) in ``mode``."""
    torch.manual_seed(0)
    net = classifier(model).to(device).train()
    fwd = torch.compile(net) if mode == "bf16+compile" else net
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode != "fp32")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with amp:
            loss = F.cross_entropy(fwd(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return net, step


def _batch(model: Model, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(model.batch, 3, model.size, model.size, generator=gen)  # (B, 3, S, S)
    y = torch.randint(0, N_CLASSES, (model.batch,), generator=gen)  # (B,)
    return x.to(device), y.to(device)


def speed(model: Model, device: torch.device, mode: str, steps: int, warmup: int) -> dict:
    """Train img/s on one batch held on the device, peak memory, and the warm-up (compile) seconds; TF32 off in
    ``fp32`` mode, on in the others (no effect off CUDA)."""
    with tf32_mode(mode != "fp32", device):
        return _speed(model, device, "fp32" if mode == "tf32" else mode, steps, warmup)


def _speed(model: Model, device: torch.device, mode: str, steps: int, warmup: int) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, step = _stepper(model, device, mode)
    x, y = _batch(model, device)
    start = time.perf_counter()
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"img_s": model.batch * steps / seconds, "peak_mib": _peak_mib(device), "warmup_s": warm}


def loader_fed(model: Model, device: torch.device, steps: int, warmup: int, workers: int | str,
               device_resize: bool = False) -> dict:  # fmt: skip
    """bf16 img/s fed by the engine's training loader (``RunContext.train_loader``: per-sample seeds, pinned memory,
    ``workers`` or auto) over ``ImageDataset`` of 32-px uint8 images through the CIFAR-at-224 presets' train transform
    (RandomResizedCrop + flip + normalise): on the CPU, or cropped at 32 px and resized on the device
    (``data.device_resize``)."""
    n = model.batch * (steps + warmup)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # (N, 32, 32, 3), as CIFAR in memory
    build = build_native_transform if device_resize else build_transform
    transform = build(True, model.size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), augment="rrc")
    data = ImageDataset(rng.integers(0, N_CLASSES, n), [str(c) for c in range(N_CLASSES)], images, transform=transform)
    loader = RunContext(TrainConfig(num_workers=workers), device).train_loader(
        data, model.batch, torch.Generator().manual_seed(0)
    )
    _, step = _stepper(model, device, "bf16")
    seen = 0
    start = time.perf_counter()
    for i, (x, y) in enumerate(loader):
        step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        if i + 1 == warmup:
            _sync(device)
            start = time.perf_counter()
        elif i + 1 > warmup:
            seen += len(y)
    _sync(device)
    seconds = time.perf_counter() - start
    return {"img_s": seen / seconds if seen else None, "workers": loader.num_workers}


def agreement(model: Model, device: torch.device, steps: int = 20) -> dict:
    """Loss after ``steps`` identical SGD steps in fp32 and in bf16 autocast, and their relative difference."""
    losses = {}
    for mode in ("fp32", "bf16"):
        _, step = _stepper(model, device, mode)
        for i in range(steps):
            loss = step(*_batch(model, device, seed=i))
        losses[mode] = float(loss)
    rel = abs(losses["bf16"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)
    return {"loss_fp32": losses["fp32"], "loss_bf16": losses["bf16"], "rel_diff": rel}


def check_model(model: Model, device: torch.device, args: argparse.Namespace) -> dict:
    row: dict = {"model": model.label, "backbone": model.backbone, "size": model.size, "batch": model.batch}
    for mode in MODES:
        if mode == "bf16+compile" and not args.compile:
            continue
        try:
            row[mode] = speed(model, device, mode, args.steps, args.warmup)
        except Exception as e:  # noqa: BLE001 - a failing mode is a finding, the check goes on
            row[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    ref = row.get("bf16", {}).get("img_s")
    for key, on_device in (("loader", False), ("loader_device_resize", True)):
        fed = loader_fed(model, device, args.steps, args.warmup, args.workers, on_device)
        row[key] = fed | {"ratio_to_in_memory": fed["img_s"] / ref if fed["img_s"] and ref else None}
    row["agreement"] = agreement(model, device)
    return row


# ---- through the engine ---------------------------------------------------------------------------------------------
def _tiny_run(device: str, name: str, out_dir: str, **extra: str) -> list[str]:
    base = {"out_dir": out_dir, "name": name, "data.name": "synthetic", "data.image_size": "16",
            "data.options": "{n_classes: 4, n_per_class: 40, n_test_per_class: 5, image_size: 16}",
            "scenario.n_tasks": "2", "model.backbone": "vit_nano_patch4_32", "model.pretrained": "false",
            "model.kwargs": "{depth: 1, embed_dim: 32, num_heads: 2, img_size: 16}", "train.epochs": "2",
            "train.batch_size": "8", "train.progress": "false", "train.tensorboard": "false", "train.device": device,
            "train.amp": "true"}  # fmt: skip
    return [f"{k}={v}" for k, v in (base | extra).items()]


def _run_process(overrides: list[str], kill_at: int = 0, resume: bool = False) -> int:
    """``retain run`` in a fresh process (``kill_at``: it SIGKILLs itself after that many optimiser steps)."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", json.dumps(overrides), str(kill_at)]
    cmd += ["--resume"] if resume else []
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600).returncode


def _child(overrides: list[str], kill_at: int, resume: bool) -> None:
    from retain.engine import checkpoint, run

    if kill_at:
        real, seen = checkpoint.Checkpointer.after_step, [0]

        def after_step(self, loop):
            real(self, loop)
            seen[0] += 1
            if seen[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpointer.after_step = after_step
    run(load_config(None, overrides), resume=resume, log=lambda *_: None)


def resume_with_workers(device: str, out_dir: str, workers: int = 2) -> dict:
    """Uninterrupted vs SIGKILLed at step 13 (inside task 0's second epoch; checkpoints every 4 steps) + resumed."""
    from safetensors.torch import load_file

    extra = {"train.num_workers": str(workers), "data.augment": "crop_flip", "run.checkpoint_every": "4"}
    full, cut = (_tiny_run(device, n, out_dir, **extra) for n in ("full", "cut"))
    codes = [_run_process(full), _run_process(cut, kill_at=13), _run_process(cut, resume=True)]
    a, b = (load_file(str(Path(out_dir) / n / "checkpoints" / "task_001.safetensors")) for n in ("full", "cut"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"workers": workers, "killed": codes[1] == -signal.SIGKILL, "exit_codes": codes, "identical": same}


def every_method(device: str, out_dir: str, names: list[str] | None = None) -> dict:
    """One short run (2 tasks, 2 epochs) of every registered method (or ``names``) on the device; seconds or the
    error."""
    from retain.engine import run

    out = {}
    for name in names or method_names():
        extra = {"method.name": name}
        if name == "confit":
            extra |= {"model.backbone": "cifar_resnet20", "model.kwargs": "{}", "scenario.protocol": "task_il"}
        start = time.perf_counter()
        try:
            rec = run(load_config(None, _tiny_run(device, f"m-{name}", out_dir, **extra)), log=lambda *_: None)
            out[name] = {"ok": True, "seconds": time.perf_counter() - start, "final_acc": rec["accuracy_matrix"][-1],
                         "precision": rec["precision"]}  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a failing method is a finding, the check goes on
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return out


def compile_and_syncs(device: str, out_dir: str, compile: bool = True) -> dict:
    """``train.compile=true`` over 4 tasks (graphs compiled, a '[compile]' line if torch gave up, accuracy against
    the uncompiled run; skipped with ``compile=False``) and the host-device syncs of a run with ``train.sync_every``
    1 and 10 (``torch.cuda.set_sync_debug_mode`` warnings over the whole run, and its training seconds)."""
    from retain.engine import compiling, run

    out: dict = {"compile": None}
    if compile:
        four = {"scenario.n_tasks": "4", "data.options": "{n_classes: 8, n_per_class: 40, n_test_per_class: 5, "
                "image_size: 16}"}  # fmt: skip
        logs: list[str] = []
        on = run(load_config(None, _tiny_run(device, "compiled", out_dir, **four, **{"train.compile": "true"})),
                 log=logs.append)  # fmt: skip
        graphs = compiling.compilations()
        off = run(load_config(None, _tiny_run(device, "uncompiled", out_dir, **four)), log=lambda *_: None)
        out["compile"] = {"graphs": graphs, "notes": [x for x in logs if x.startswith("[compile]")],
                          "acc": on["accuracy_matrix"][-1], "acc_uncompiled": off["accuracy_matrix"][-1]}  # fmt: skip
    for every in (1, 10):
        cfg = load_config(None, _tiny_run(device, f"sync{every}", out_dir, **{"train.sync_every": str(every)}))
        out[f"sync_every_{every}"] = _count_syncs(cfg, device)
    return out


def _count_syncs(cfg, device: str) -> dict:
    """A run's host-device syncs (CUDA's sync debug warnings; 0 elsewhere) and training seconds."""
    import warnings

    from retain.engine import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            rec = run(cfg, log=lambda *_: None)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return {"syncs": sum("synchroniz" in str(w.message) for w in caught), "train_seconds": rec["total_time_s"]}


def _compile_line(r: dict) -> str:
    c = r["compile"]
    syncs = ", ".join(f"sync_every={k.rsplit('_', 1)[1]}: {v['syncs']} syncs, {v['train_seconds']:.1f} s training"
                      for k, v in r.items() if k.startswith("sync_every"))  # fmt: skip
    if c is None:
        return f"host-device syncs of a run: {syncs}"
    notes = "; ".join(c["notes"]) or "none"
    return (f"train.compile over 4 tasks: {c['graphs']} graphs, compile notes: {notes}; final accuracy {c['acc']} "
            f"(uncompiled {c['acc_uncompiled']})\nhost-device syncs of a run: {syncs}")  # fmt: skip


SYNC_TOL = 1e-3  # absolute + relative, 2 vs 1 GPU in fp32; per-process BN statistics differ by about 1e-2


def confit_sync_bn(out_dir: str, device: str = "cuda") -> dict:
    """ConFiT (task-IL, CIFAR ResNet-20, fp32, TF32 off) on 2 GPUs (torchrun, NCCL, SyncBatchNorm) vs 1 GPU: the
    largest gap over every tensor of the last checkpoint (weights, BN running statistics, Xconv trackers).
    ``device="cpu"`` runs the same on 2 gloo processes, where BN is per process: the check's counter-example."""
    from safetensors.torch import load_file

    n = torch.cuda.device_count()
    if device == "cuda" and n < 2:
        return {"ran": False, "why": f"needs 2 CUDA devices ({n} visible)"}
    extra = {"method.name": "confit", "model.backbone": "cifar_resnet20", "model.kwargs": "{}",
             "scenario.protocol": "task_il", "train.amp": "false", "train.tf32": "false"}  # fmt: skip
    one, two = (_tiny_run(device, name, out_dir, **extra) for name in ("sync-1", "sync-2"))
    codes = [_run_process(one)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "benchmarks.gpu_check", "--child", json.dumps(two), "0"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    codes.append(subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600).returncode)
    if any(codes):
        return {"ran": True, "ok": False, "exit_codes": codes}
    a, b = (load_file(str(Path(out_dir) / r / "checkpoints" / "task_001.safetensors")) for r in ("sync-1", "sync-2"))
    gap = {k: ((a[k].float() - b[k].float()).abs() / (1 + a[k].float().abs())).max().item() for k in a}  # atol = rtol
    worst = max(gap, key=gap.get)
    bn = max(v for k, v in gap.items() if k.endswith("running_mean"))
    return {"ran": True, "ok": a.keys() == b.keys() and gap[worst] <= SYNC_TOL, "exit_codes": codes,
            "worst": worst, "gap": gap[worst], "bn_gap": bn}  # fmt: skip


def _sync_line(r: dict) -> str:
    head = "ConFiT on 2 processes (SyncBatchNorm) vs 1"
    if not r["ran"]:
        return (f"{head}: {r['why']}; it would check that weights, BN statistics and Xconv trackers of a 2-GPU run "
                "equal the 1-GPU run's")  # fmt: skip
    if "gap" not in r:
        return f"{head}: a run failed (exit codes {r['exit_codes']})"
    return f"{head}: equal {r['ok']} (largest gap {r['gap']:.1e}, in {r['worst']}; BN means {r['bn_gap']:.1e})"


# ---- plan, table, main ----------------------------------------------------------------------------------------------
def check_plan(models: tuple[Model, ...]) -> list[str]:
    """What is wrong with the plan: a model that does not build (meta device), a method config that does not parse."""
    problems = []
    for m in models:
        try:
            with torch.device("meta"):
                classifier(m)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{m.label}: {type(e).__name__}: {e}")
    for name in method_names():
        try:
            load_config(None, _tiny_run("cuda", "plan", "runs", **{"method.name": name}))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {type(e).__name__}: {e}")
    return problems


def table(rows: list[dict]) -> str:
    def cell(row: dict, mode: str) -> str:
        r = row.get(mode)
        if r is None:
            return "-"
        if "error" in r:
            return "error"
        mem = f", {r['peak_mib']:,.0f} MiB" if r.get("peak_mib") is not None else ""
        return f"{r['img_s']:,.0f}{mem}" + (f" (compile {r['warmup_s']:.0f} s)" if mode == "bf16+compile" else "")

    def fed(row: dict, key: str) -> str:
        ratio = row[key]["ratio_to_in_memory"]
        return f"{ratio:.2f} ({row[key]['workers']} workers)" if ratio is not None else "-"

    header = ("| model | batch | fp32 img/s | tf32 img/s | bf16 img/s | bf16+compile img/s | loader-fed / in-memory | "
              "same, device resize | bf16 vs fp32 |")  # fmt: skip
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {cell(r, 'fp32')} | {cell(r, 'tf32')} | {cell(r, 'bf16')} | "
                     f"{cell(r, 'bf16+compile')} | {fed(r, 'loader')} | {fed(r, 'loader_device_resize')} | "
                     f"{r['agreement']['rel_diff']:.2e} |")  # fmt: skip
    return "\n".join(lines)


def _workers(value: str) -> int | str:
    return value if value == "auto" else int(value)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="two tiny models instead of the paper presets' (tests, CPU)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--workers", type=_workers, default="auto", help="loader workers (default: auto, as a run picks)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the bf16 + compile column")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods' short runs (default: all)")
    p.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu_check.json, else benchmarks/results/)")
    p.add_argument("--child", nargs=2, metavar=("OVERRIDES", "KILL_AT"), help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        _child(json.loads(args.child[0]), int(args.child[1]), args.resume)
        return 0
    models = TINY if args.tiny else MODELS
    problems = check_plan(models)
    if problems:
        print("gpu_check: the plan is broken: " + "; ".join(problems))
        return 2
    if args.device is None and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device on this machine; the plan ({len(models)} models, {len(method_names())} "
              "methods, resume with 2 workers) builds and parses; run it on a GPU machine")  # fmt: skip
        return 0
    device = torch.device(args.device or "cuda")
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k not in ("child",)},
              "models": [asdict(m) for m in models]}  # fmt: skip
    result["rows"] = [check_model(m, device, args) for m in models]
    print(table(result["rows"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["resume"] = resume_with_workers(device.type, tmp)
        print(f"resume after SIGKILL inside an epoch, 2 workers: identical weights {result['resume']['identical']}")
        result["methods"] = every_method(device.type, tmp, args.methods)
        result["compile_and_syncs"] = compile_and_syncs(device.type, tmp, args.compile)
        print(_compile_line(result["compile_and_syncs"]))
        result["confit_sync_bn"] = confit_sync_bn(tmp) if device.type == "cuda" else {"ran": False, "why": "CPU"}
        print(_sync_line(result["confit_sync_bn"]))
    failed = [n for n, r in result["methods"].items() if not r["ok"]]
    print(f"every method, one short run: {len(result['methods']) - len(failed)} ok" +
          (f", failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    result["precision"] = next((r["precision"] for r in result["methods"].values() if r["ok"]), None)
    print(f"precision of a run with the default train.tf32 (metrics.json): {result['precision']}")
    result["seconds"] = time.perf_counter() - start
    out = Path(args.out) if args.out else Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out = out / "gpu_check.json" if out.suffix != ".json" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    synced = result["confit_sync_bn"].get("ok", True)
    return 0 if result["resume"]["identical"] and not failed and synced else 1


if __name__ == "__main__":
    raise SystemExit(main())
