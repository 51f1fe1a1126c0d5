"""The docs name only options and files that exist: every dotted option in docs/**/*.md and README.md resolves
against the config schema, and every repository path in backticks exists.

Options are read where a reader would copy them: a backticked ``section.key`` or ``section.key=value`` (also each
``key=value`` word of a backticked or fenced command) whose section is a config section (``run``, ``data``,
``scenario``, ``model``, ``train``, ``method``). ``method.X`` must be a field of at least one registered method's
config class; a key under a dict field (``data.options.n_classes``) is not checked further. Paths: a backticked
``retain/...``, ``benchmarks/...``, ``tests/...`` or ``docs/...`` (``{a,b}`` alternatives expanded; placeholders
such as ``<name>``, ``NNN`` or ``*`` make it a pattern, checked by glob).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import typing
from pathlib import Path

import pytest

from retain.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
SECTIONS = ("run", "data", "scenario", "model", "train", "method")

# Dotted names in backticks that are not options, each with the reason.
NOT_OPTIONS = {
    "method.loss": "the Method hook `loss` (docs/architecture.md: a batch's loss is `Stage.loss` or `method.loss`)",
    "method.export_path": "a removed key, named as refused with a hint (retain.config.MOVED; docs/architecture.md)",
    "model.features": "ContinualModel.features, a Python attribute (docs/distributed.md)",
    "model.head": "ContinualModel.head, a Python attribute (docs/distributed.md)",
    "model.transform": "Predictor.transform, a Python attribute of `model = retain.load(...)` (tutorials/deploy.md)",
}
# Paths in backticks that need not exist, each with the reason.
NOT_FILES = {
    "benchmarks/results/gpu_check.json": "written by `python -m benchmarks.gpu_check` (docs/performance.md)",
    "retain/methods/l2_previous.py": "the file the new-method tutorial asks the reader to create",
}
# File suffixes that make a dotted name a file name, not an option (``scenario.json``, ``run.py``).
FILE_SUFFIXES = {"json", "yaml", "yml", "py", "md", "safetensors", "png", "csv", "txt", "npz", "html", "pth", "th"}

_CODE = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_OPTION = re.compile(r"(?<![\w./-])((?:" + "|".join(SECTIONS) + r")(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(=|\b)")
_PATH = re.compile(r"^(?:retain|benchmarks|tests|docs)/[\w./{},<>*-]*$")


def _hints(cls: type) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _method_fields() -> dict[str, typing.Any]:
    from retain.config import METHOD_CONFIGS

    out: dict[str, typing.Any] = {}
    for name in METHOD_CONFIGS.names():
        out |= _hints(METHOD_CONFIGS.get(name))
    return out


def option_exists(dotted: str) -> bool:
    """Whether ``dotted`` (``train.lr``, ``data.retention.k``, ``method.lamb``) is a key of the config schema."""
    parts = dotted.split(".")
    fields: dict[str, typing.Any] = _hints(RunConfig)
    for i, part in enumerate(parts):
        if part not in fields:
            return False
        tp = fields[part]
        if i == 0 and part == "method":
            fields = _method_fields()
            continue
        if dataclasses.is_dataclass(tp):
            fields = _hints(tp)
        elif i < len(parts) - 1:  # below a leaf: only a dict field has keys of its own
            return typing.get_origin(tp) is dict or tp is dict or "dict" in str(tp)
    return True


def _options_in(text: str) -> set[str]:
    found = set()
    spans = [m.group(1) for m in _CODE.finditer(_FENCE.sub("", text))] + [m.group(1) for m in _FENCE.finditer(text)]
    for span in spans:
        for m in _OPTION.finditer(span):
            name = m.group(1)
            if name.rsplit(".", 1)[-1] in FILE_SUFFIXES:
                continue
            if m.group(2) == "=" or m.group(1) == span.strip():
                found.add(name)
    return found


def _paths_in(text: str) -> set[str]:
    found = set()
    for m in _CODE.finditer(text):
        for word in m.group(1).split():
            word = word.rstrip(",.;:)")
            if _PATH.match(word):
                found.add(word)
    return found


def _expand(path: str) -> list[str]:
    """``retain/methods/{l2p,dualprompt}.py`` -> both paths."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return list(itertools.chain.from_iterable(_expand(path[: m.start()] + alt + path[m.end() :])
                                              for alt in m.group(1).split(",")))  # fmt: skip


def path_exists(path: str) -> bool:
    for one in _expand(path):
        pattern = re.sub(r"<[^>]*>|NNN|N{1,3}(?=\b)", "*", one)
        if "*" in pattern:
            if not list(ROOT.glob(pattern.rstrip("/"))):
                return False
        elif not (ROOT / one).exists():
            return False
    return True


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_option_named_exists(page):
    bad = sorted(o for o in _options_in(page.read_text()) if o not in NOT_OPTIONS and not option_exists(o))
    assert not bad, f"{_page_id(page)} names options the config schema does not have: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_file_named_exists(page):
    bad = sorted(p for p in _paths_in(page.read_text()) if p not in NOT_FILES and not path_exists(p))
    assert not bad, f"{_page_id(page)} names files that do not exist: {bad}"


def test_the_checks_catch_what_they_should():
    assert option_exists("train.lr") and option_exists("data.retention.k") and option_exists("method.lamb")
    assert option_exists("data.options.n_classes") and option_exists("run.checkpoint_every")
    assert not option_exists("train.learning_rate") and not option_exists("method.nope")
    assert not option_exists("train.lr.x")
    assert _options_in("use `train.lr=0.1 method.r=4` and `scenario.n_tasks`; `scenario.json`, `a.train.lr`") == {
        "train.lr", "method.r", "scenario.n_tasks"}  # fmt: skip
    assert path_exists("retain/engine/loop.py") and path_exists("retain/methods/{ewc,lwf}.py")
    assert path_exists("retain/configs/<group>/<name>.yaml")
    assert not path_exists("retain/engine/nope.py") and not path_exists("retain/methods/{ewc,nope}.py")
