"""The performance suite: every performance benchmark at one size, in this process, into one results file.

    python -m benchmarks                          # small size, all scripts -> benchmarks/results/<machine>.json
    python -m benchmarks --size full --out perf.json
    python -m benchmarks --only method_costs pad_overhead
    python benchmarks/table.py benchmarks/results/<machine>.json   # the table in docs/measured.md from it

In the suite (each prints ratios measured side by side in one session; ``--small`` on each is the suite's size):

- ``method_costs``: per method, train img/s and step memory against the plain backbone step with the same trainable
  set, inference against a plain forward, storage per task against the parameters the task adds;
- ``ln_tuning_speed``: LN tuning's per-task LayerNorms against plain timm ViTs;
- ``pad_overhead``: a PAD step against an LwF step;
- ``peft_vit_speed``: LoRA and Block Expansion steps and merged-LoRA inference against plain timm ViTs;
- ``ddp_cpu``: training img/s of 2 processes x 1 thread (torchrun, gloo) against 1 process x 2 threads.

Not in it: the accuracy benchmarks (``confit_cpu`` ~10 min, ``pad_cpu`` ~16 min, ``peft_vit_cpu`` ~1 h,
``ln_tuning_schedule``: whole runs on real data; they measure accuracy, and their speed figures are whole-run times
of runs one after another, not side-by-side ratios), ``fingerprint`` (a behaviour check between commits) and
``build_cifar10_sample`` (builds a data file).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from benchmarks.common import machine_info  # noqa: E402

SUITE = ["method_costs", "ln_tuning_speed", "pad_overhead", "peft_vit_speed", "ddp_cpu"]
RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = 1


def machine_slug(info: dict) -> str:
    """A file name for the machine: CPU model and core count, e.g. ``amd-epyc-2c``."""
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|@.*", "", info["cpu"].lower())
    return f"{re.sub(r'[^a-z0-9]+', '-', cpu).strip('-') or 'cpu'}-{info['cores']}c"


def run_suite(only: list[str], size: str, threads: int, command: str) -> dict:
    """Each script's ``collect`` in turn; a script that fails records its error and the others still run."""
    torch.set_num_threads(threads)
    argv = (["--small"] if size == "small" else []) + ["--threads", str(threads)]
    machine = machine_info() | {"load_before": _load()}
    results = {"schema": SCHEMA, "command": command, "size": size, "machine": machine,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "scripts": {}}  # fmt: skip
    for name in only:
        start = time.perf_counter()
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        try:
            entry = importlib.import_module(f"benchmarks.{name}").collect(argv)
        except Exception as e:  # noqa: BLE001 - one broken script must not lose the others' numbers
            entry = {"error": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        entry["command"] = f"python benchmarks/{name}.py {' '.join(argv)}"
        results["scripts"][name] = entry
        print(f"[benchmarks] {name}: {entry['seconds']} s{' (failed)' if 'error' in entry else ''}", file=sys.stderr)
    results["machine"]["load_after"] = _load()
    return results


def _load() -> float | None:
    """The 1-minute load average (other jobs on the machine move timings; the results file keeps it)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["small", "full"], default="small", help="small: each script's --small")
    p.add_argument("--only", nargs="+", choices=SUITE, default=SUITE, metavar="SCRIPT", help=f"from {SUITE}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/<machine>.json)")
    args = p.parse_args(argv)
    command = " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)])
    results = run_suite(args.only, args.size, args.threads, command)
    out = args.out or RESULTS / f"{machine_slug(results['machine'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    failed = [n for n, e in results["scripts"].items() if "error" in e]
    for n in failed:
        print(f"{n} failed: {results['scripts'][n]['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
