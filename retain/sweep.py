"""Sweeps: the cross product of comma-separated override values, run one after another into one folder.

``retain sweep PRESET method.name=lwf,ewc seed=0,1,2 train.epochs=3`` runs 6 configs into
``<out_dir>/<sweep name>/<run name>/`` (the sweep name: ``name=``, by default the preset's name + ``-sweep``;
run names such as ``lwf_seed=0``; with ``--out DIR`` the sweep folder is ``DIR`` itself) and keeps an index,
``sweep.json`` (the command's preset, its fixed and swept overrides, and each run's overrides, name and status).
Every combination's config is validated before anything runs. Running the same command again (the same ``--out``
too) skips the finished runs and resumes an interrupted one (``retain run --resume``); a command that adds values
to the swept keys extends the sweep; any other change is refused. Ctrl-C stops the running run as ``retain run``
does (a checkpoint is saved) and leaves every finished run intact.

Values split on top-level commas only: ``scenario.class_order=[0,1,2],[2,1,0]`` is two values, and
``data.options={n_classes: 4, image_size: 16}`` one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retain import runindex
from retain.config import ConfigError, RunConfig, choice_sections, load_config
from retain.runindex import CONFIG_FILE, METRICS_FILE, STATE_FILE, STATUSES, SWEEP_FILE, SweepRun, read_index

__all__ = ["SWEEP_FILE", "STATUSES", "Sweep", "SweepRun", "split_values", "parse_sweep", "plan_sweep", "describe",
           "run_sweep", "read_index", "run_status", "write_index"]  # fmt: skip

_NOT_SWEPT = ("name", "out_dir")  # one sweep folder, one name per run: chosen by the sweep
_OPEN, _CLOSE = "[{(", "]})"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_MAX_NAME = 80


@dataclass
class Sweep:
    """A planned sweep: the index's content plus the validated config of each of the command's runs."""

    path: Path
    preset: str | None
    fixed: list[str]  # overrides with one value
    grid: dict[str, list[str]]  # swept key -> values, in command order
    runs: list[SweepRun]  # every run of the index (earlier commands' too), in order
    configs: dict[str, RunConfig] = field(default_factory=dict)  # run name -> config, for this command's runs
    # run name -> the overrides of ``retain run PRESET ...`` that load exactly that config (name, out_dir last)
    overrides: dict[str, list[str]] = field(default_factory=dict)

    def index(self) -> dict[str, Any]:
        return {"preset": self.preset, "fixed": self.fixed, "grid": self.grid,
                "runs": [dataclasses.asdict(r) for r in self.runs]}  # fmt: skip


# ----------------------------------------------------------------------------------------------- parsing


def split_values(text: str) -> list[str]:
    """Splits an override's value on commas outside brackets, braces, parentheses and quotes.

    >>> split_values("[1,2],[2,1]")
    ['[1,2]', '[2,1]']
    """
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_sweep(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """``key=a,b,c`` items as ``(key, values)`` in command order; ConfigError naming a malformed item."""
    out: list[tuple[str, list[str]]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value or key=a,b,c (e.g. seed=0,1,2)")
        key, text = item.split("=", 1)
        values = split_values(text)
        if len(values) > 1 and any(v.strip() == "" for v in values):
            raise ConfigError(f"{key}={text}: an empty value in the list; write key=a,b,c")
        if len(values) > 1 and key in _NOT_SWEPT:
            raise ConfigError(f"{key}={text}: {key} cannot take a list; the sweep sets each run's name and folder "
                              "(give the sweep one name=NAME)")  # fmt: skip
        out.append((key, values))
    keys = [k for k, _ in out]
    for key in {k for k, v in out if len(v) > 1}:
        if keys.count(key) > 1:
            raise ConfigError(f"{key} is given twice; give it once, with all its values (key=a,b,c)")
    return out


# ----------------------------------------------------------------------------------------------- planning


def _value_label(value: str) -> str:
    """A value as part of a folder name: each run of other characters becomes one "-" (none at the ends)."""
    value = value.strip()
    label = _SAFE.sub("-", value)
    label = label[1:] if value and _SAFE.match(value[0]) else label
    label = label[:-1] if value and _SAFE.match(value[-1]) else label
    return label or "x"


def _run_name(combo: dict[str, str]) -> str:
    """``lwf_seed=0`` for ``{method.name: lwf, seed: 0}``: a choice section's name as its value, other keys by
    their last part (the whole key where last parts repeat)."""
    leaves = [k.split(".")[-1] for k in combo]
    sections = set(choice_sections())
    parts = []
    for key, value in combo.items():
        if key in sections or (key.endswith(".name") and key[: -len(".name")] in sections):
            parts.append(_value_label(value))
        else:
            label = key if leaves.count(key.split(".")[-1]) > 1 else key.split(".")[-1]
            parts.append(f"{label}={_value_label(value)}")
    return "_".join(parts) or "run"


def _unique_names(combos: list[dict[str, str]]) -> list[str]:
    names = [_run_name(c) for c in combos]
    for i, (name, combo) in enumerate(zip(names, combos, strict=True)):
        if len(name) > _MAX_NAME or names.count(name) > 1:
            digest = hashlib.sha256(json.dumps(combo, sort_keys=True).encode()).hexdigest()[:8]
            names[i] = f"{name[: _MAX_NAME - 9]}-{digest}"
    return names


def _sweep_name(cfg: RunConfig, preset: str | None, items: list[tuple[str, list[str]]]) -> str:
    """``name=`` of the command, else the preset's run name (or the preset's own name) + ``-sweep``: never the
    folder of a plain ``retain run`` of the preset."""
    if any(k == "name" for k, _ in items):
        return cfg.name
    if cfg.name != RunConfig.name or preset is None:
        return f"{cfg.name}-sweep"
    path = Path(preset)
    return (path.stem if path.suffix in (".yaml", ".yml") else preset.replace("/", "-")) + "-sweep"


def plan_sweep(preset: str | None, overrides: list[str], out: str | Path | None = None) -> Sweep:
    """Every combination's validated config, its run name and the sweep folder, merged with an existing index.

    The sweep folder is ``out`` if given, else ``<out_dir>/<sweep name>``; every run goes into a folder under it.
    Nothing is written or run. Raises ConfigError on a malformed or invalid override (naming the combination and
    the key), or when the sweep folder was made by another command (other preset, fixed overrides or swept keys).
    """
    items = parse_sweep(overrides)
    grid = {k: v for k, v in items if len(v) > 1}
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    configs = [_config(preset, items, combo) for combo in combos]
    path = Path(out) if out is not None else Path(configs[0].out_dir) / _sweep_name(configs[0], preset, items)
    names = _unique_names(combos)
    runs = [SweepRun(n, [f"{k}={v}" for k, v in c.items()]) for n, c in zip(names, combos, strict=True)]
    fixed = [f"{k}={v[0]}" for k, v in items if len(v) == 1]
    sweep = Sweep(path, preset, fixed, grid, runs)
    pairs = zip(runs, configs, strict=True)
    sweep.configs = {r.name: dataclasses.replace(c, name=r.name, out_dir=str(path)) for r, c in pairs}
    sweep.overrides = {r.name: [*_overrides(items, c), f"name={r.name}", f"out_dir={path}"]
                       for r, c in zip(runs, combos, strict=True)}  # fmt: skip
    return _merge_index(sweep)


def _overrides(items: list[tuple[str, list[str]]], combo: dict[str, str]) -> list[str]:
    """The command's overrides in their order, each swept key at its value in ``combo``."""
    return [f"{k}={combo.get(k, values[0])}" for k, values in items]


def _config(preset: str | None, items: list[tuple[str, list[str]]], combo: dict[str, str]) -> RunConfig:
    """The config of one combination: the command's overrides in their order, each swept key at its value."""
    overrides = _overrides(items, combo)
    try:
        return load_config(preset, overrides)
    except ConfigError as e:
        where = " ".join(f"{k}={v}" for k, v in combo.items())
        raise ConfigError(f"sweep run {where}: {e}" if where else str(e)) from None


def _merge_index(sweep: Sweep) -> Sweep:
    """Keeps an existing index's runs (and their order) and appends this command's new ones; refuses another
    command's folder."""
    if any((sweep.path / f).exists() for f in (STATE_FILE, METRICS_FILE, CONFIG_FILE)):
        raise ConfigError(f"{sweep.path} holds a run, not a sweep; give the sweep another name=NEW_NAME")
    if not (sweep.path / SWEEP_FILE).exists():
        return sweep
    old = read_index(sweep.path)
    for what, was, now in (("preset", old.get("preset"), sweep.preset), ("fixed overrides", old.get("fixed"),
                           sweep.fixed), ("swept keys", list(old.get("grid", {})), list(sweep.grid))):  # fmt: skip
        if was != now:
            raise ConfigError(f"{sweep.path} holds a sweep with other {what} (was {was}, now {now}); repeat that "
                              "command to continue it, or give this one another name=NEW_NAME")  # fmt: skip
    known = {r["name"]: SweepRun.from_dict(r) for r in old["runs"]}
    new = [r for r in sweep.runs if r.name not in known]
    sweep.runs = list(known.values()) + new
    sweep.grid = {k: list(dict.fromkeys(old["grid"][k] + v)) for k, v in sweep.grid.items()}
    return sweep


# ----------------------------------------------------------------------------------------------- running


def run_status(run_dir: str | Path) -> str:
    """``finished`` (every task in ``metrics.json``), ``interrupted`` (a run was started there) or ``pending``."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
        if record.get("finished_tasks") == record.get("n_tasks"):
            return "finished"
    except (OSError, ValueError, AttributeError):
        pass
    return "interrupted" if (run_dir / STATE_FILE).exists() else "pending"


def write_index(sweep: Sweep) -> None:
    """``sweep.json``, replaced atomically."""
    runindex.write_index(sweep.path, sweep.index())


def run_sweep(sweep: Sweep, log: Callable[[str], Any] = print) -> list[SweepRun]:
    """Runs the command's runs one after another; returns those that failed (their status says why).

    A finished run is skipped and a started one resumed. A run that fails (a RunError such as a non-finite loss, a
    configuration or data error) is marked ``failed`` and the sweep goes on. Ctrl-C marks the running run
    ``interrupted``, writes the index and propagates.
    """
    from retain.engine import RunError, run

    failed = []
    todo = [r for r in sweep.runs if r.name in sweep.configs]
    for i, entry in enumerate(todo, 1):
        run_dir = sweep.path / entry.name
        entry.status, entry.error = run_status(run_dir), None
        if entry.status == "finished":
            log(f"[sweep] {i}/{len(todo)} {entry.name}: finished before, skipped")
            continue
        resume = entry.status == "interrupted"
        log(f"[sweep] {i}/{len(todo)} {entry.name}: " + ("resuming" if resume else "starting"))
        entry.status = "running"
        write_index(sweep)
        try:
            run(sweep.configs[entry.name], resume=resume, log=log)
            entry.status = "finished"
        except KeyboardInterrupt:
            entry.status = "interrupted"
            raise
        except (RunError, ConfigError, OSError, KeyError, ValueError) as e:
            entry.status, entry.error = "failed", _first_line(e)
            failed.append(entry)
            log(f"[sweep] {entry.name} failed: {entry.error}")
        finally:
            write_index(sweep)
    return failed


def describe(sweep: Sweep) -> str:
    """One line per run of the index: status (read from its folder), name and swept overrides."""
    lines = [f"sweep {sweep.path} ({len(sweep.runs)} runs)"]
    for r in sweep.runs:
        status = run_status(sweep.path / r.name)
        mark = "" if r.name in sweep.configs else "  (not in this command)"
        mark += f"  [{r.launcher} job {r.job_id}]" if r.job_id else ""
        lines.append(f"  {status:<11s} {r.name}  {' '.join(r.overrides)}{mark}")
    return "\n".join(lines)


def _first_line(e: BaseException) -> str:
    lines = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
