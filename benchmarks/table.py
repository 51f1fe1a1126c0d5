"""Render a results file of ``python -m benchmarks`` as the performance tables of docs/measured.md (markdown).

    python benchmarks/table.py benchmarks/results/amd-epyc-2c.json                    # print
    python benchmarks/table.py benchmarks/results/amd-epyc-2c.json --update docs/measured.md  # between the markers

``--update`` rewrites only the text between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"


def _x(ratio: float | None) -> str:
    return "" if ratio is None else f" ({ratio:.2f}x)"


def method_table(entry: dict) -> list[str]:
    """One row per method: train img/s, step memory, inference img/s (each with its ratio to plain), storage."""
    lines = ["| method | protocol | step on | trained: method / plain | train img/s (plain / method time) "
             "| step memory MiB (method / plain) | inference img/s (plain / method time) "
             "| bytes / task (÷ bytes the task added) |", "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in entry["rows"]:
        if "train_img_s" in r:
            trained = f"{r['trainable']:,} / {r['ref_trainable']:,} ({r['reference']})"
            train = f"{r['train_img_s']:,.0f}{_x(r['train_ratio'])}"
            on = f"{r['stage']}: {r['inputs']}"
        else:
            trained, train, on = "-", "no gradient step", "-"
        mem = f"{r['peak_mib']:.1f}{_x(r['memory_ratio'])}" if "peak_mib" in r else "-"
        infer = f"{r['infer_img_s']:,.0f}{_x(r['infer_ratio'])}"
        ratio = r["storage_ratio"]
        store = f"{r['storage_bytes_per_task']:,}" + ("" if ratio is None else f" ({ratio:.2f})")
        lines.append(f"| {r['method']} | {r['protocol']} | {on} | {trained} | {train} | {mem} | {infer} | {store} |")
    return lines


def ratio_rows(name: str, entry: dict) -> list[str]:
    """``| script | comparison | ratio |`` rows of the scripts that compare pairs of variants."""
    if name == "pad_overhead":
        return [f"| {name} | {r['variant']} step vs LwF step (time ratio, <= 1.2 goal) | {r['ratio']:.3f} |"
                for r in entry["rows"] if r["variant"] != "lwf"]  # fmt: skip
    if name == "ddp_cpu":
        return [f"| {name} | {r['case']} (img/s ratio; no goal, may be below 1 on a CPU) | {r['ratio']:.3f} |"
                for r in entry["rows"]]  # fmt: skip
    return [f"| {name} | {r['case']} (reference / ours time) | {r['ratio']:.3f} |" for r in entry["rows"]]


def render(results: dict) -> str:
    m, scripts = results["machine"], results["scripts"]
    load = f", load average {m['load_before']:.1f} -> {m['load_after']:.1f}" if "load_after" in m else ""
    out = [f"Machine: {m['cpu']}, {m['cores']} cores ({m['cpu_capability']}){load}, torch {m['torch']}, "
           f"{m['threads']} thread(s){', GPU ' + m['gpu'] if m.get('gpu') else ''}; {results['date']}. "
           f"Command: `{results['command']}` ({results['size']} size), then "
           "`python benchmarks/table.py RESULTS.json`.", ""]  # fmt: skip
    costs = scripts.get("method_costs", {})
    if "rows" in costs:
        s = costs["settings"]
        calib = (costs["memory_calibration_64mib"] or 0) / 2**20
        rounds = f"{s['rounds']} interleaved rounds (inference {s.get('inference_rounds', s['rounds'])})"
        c = costs.get("aa_control")
        aa = f"; A/A control (1.00 on a quiet machine): train {c['train']:.2f}x, inference " if c else ""
        aa += f"{c['inference']:.2f}x" if c else ""
        out += [f"Per method (`benchmarks/method_costs.py`: batch {s['batch']}, medians of {rounds}; memory "
                f"calibration: a 64 MiB tensor measured {calib:.1f} MiB{aa}):", ""]  # fmt: skip
        out += [*method_table(costs), ""]
    rows = [line for name, e in scripts.items() if name != "method_costs" and "rows" in e
            for line in ratio_rows(name, e)]  # fmt: skip
    if rows:
        out += ["| script | comparison | ratio |", "|---|---|---:|", *rows, ""]
    failed = [f"{name}: {e['error']}" for name, e in scripts.items() if "error" in e]
    out += [f"Failed: {f}" for f in failed]
    return "\n".join(out).rstrip() + "\n"


def update(path: Path, table: str) -> None:
    """Replace the text between the markers in ``path`` with ``table``."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} markers; add them where the table goes")
    head, rest = text.split(START, 1)
    path.write_text(f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--update", type=Path, help="a markdown file whose marked section to replace")
    args = p.parse_args(argv)
    table = render(json.loads(args.results.read_text()))
    if args.update:
        update(args.update, table)
        print(f"updated {args.update}")
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
