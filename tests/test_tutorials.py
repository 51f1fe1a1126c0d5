"""Every tutorial in docs/tutorials/ runs, as written, on its own tiny data, so the tutorials cannot rot.

How a page's fenced blocks are run, in page order, in one empty working folder per test:

- a block with a title (```` ```python title="make_shapes.py" ````, also yaml or bash) is written to that file;
- an untitled ``python`` block is executed in-process (one namespace per page);
- an untitled ``bash`` block: each command (``\\`` continues a line; ``#`` comments dropped) is run: ``retain ...``
  by ``retain.cli.main`` in-process, ``python FILE.py`` by ``runpy``; any other command fails the test;
- ``text`` / ``console`` blocks are output, not run;
- ``<!-- tutorial: skip (reason) -->`` on the line before a block: not run (installs, commands for a GPU box);
- ``<!-- tutorial: dry -->`` before a block (titled or not): its ``retain`` commands are checked, not run:
  ``retain run`` / ``retain pretrain`` get ``--print-config``, ``retain sweep`` gets ``--dry-run``; a launcher before
  them (``srun``, ``torchrun ... -m retain``) is dropped; other lines (``export``, ``#SBATCH``) are ignored.

A tutorial's blocks see only what earlier blocks of the page (or a page named in ``NEEDS``) made.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from retain.cli import main

TUTORIALS = Path(__file__).resolve().parent.parent / "docs" / "tutorials"
NEEDS = {"deploy.md": ["imagefolder.md"]}  # pages whose runs a tutorial starts from

_FENCE = re.compile(r"^```(\w+)?([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
_MARK = re.compile(r"<!--\s*tutorial:\s*(skip|dry)\b[^>]*-->\s*$")
_TITLE = re.compile(r'title="([^"]+)"')


@dataclass
class Block:
    lang: str
    title: str | None
    code: str
    mark: str | None  # skip | dry | None
    line: int


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` with their language, title and the mark on the line before (if any)."""
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        title = _TITLE.search(m.group(2) or "")
        out.append(Block(m.group(1) or "", title and title.group(1), m.group(3), mark and mark.group(1),
                         text[: m.start()].count("\n") + 1))  # fmt: skip
    return out


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def dry_argv(command: str) -> list[str] | None:
    """``retain`` arguments checking ``command`` without running it, or None when it runs no retain command."""
    argv = _argv(command)
    if "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["retain"]:  # torchrun/python -m retain
        argv = argv[argv.index("-m") + 1 :]
    while argv and argv[0] in ("srun", "time", "nohup"):
        argv = argv[1:]
    if not argv or argv[0] != "retain":
        return None
    sub = argv[1]
    if sub in ("run", "pretrain"):
        return [*argv[1:], "--print-config"]
    if sub == "sweep":
        return [*argv[1:], "--dry-run"]
    if sub in ("list", "inspect"):
        return argv[1:]
    raise AssertionError(f"{command!r}: no dry form of `retain {sub}`")


def _retain(argv: list[str], where: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse errors
            rc = e.code
    assert rc in (0, None), f"{where}: `retain {shlex.join(argv)}` exited {rc}:\n{out.getvalue()[-2000:]}"
    return out.getvalue()


def run_page(page: Path, workdir: Path) -> list[str]:
    """Run ``page``'s blocks in ``workdir`` (see the module docstring); returns the outputs of the commands."""
    namespace: dict = {"__name__": "__tutorial__"}
    outputs = []
    for b in blocks(page):
        where = f"{page.name}:{b.line}"
        if b.mark == "skip" or b.lang in ("text", "console", ""):
            continue
        if b.mark == "dry":
            for cmd in commands(b.code):
                argv = dry_argv(cmd)
                if argv is not None:
                    outputs.append(_retain(argv, where))
            if b.title:
                (workdir / b.title).write_text(b.code)
            continue
        if b.title:
            (workdir / b.title).parent.mkdir(parents=True, exist_ok=True)
            (workdir / b.title).write_text(b.code)
        elif b.lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(b.code, where, "exec"), namespace)
            outputs.append(out.getvalue())
        elif b.lang == "bash":
            for cmd in commands(b.code):
                argv = _argv(cmd)
                if argv[0] == "retain":
                    outputs.append(_retain(argv[1:], where))
                elif argv[0] == "python" and len(argv) == 2 and argv[1].endswith(".py"):
                    out = io.StringIO()
                    with contextlib.redirect_stdout(out):
                        runpy.run_path(str(workdir / argv[1]), run_name="__main__")
                    outputs.append(out.getvalue())
                else:
                    raise AssertionError(f"{where}: {cmd!r} is neither `retain ...` nor `python FILE.py`; mark the "
                                         "block <!-- tutorial: skip (why) --> if the tests cannot run it")  # fmt: skip
        else:
            raise AssertionError(f"{where}: an untitled {b.lang!r} block; give it a title (a file) or mark it")
    return outputs


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder on ``sys.path`` (a tutorial's modules import each other); the method registries and
    ``sys.modules`` are restored afterwards, so a tutorial's method does not leak into other tests."""
    from retain.config import METHOD_CONFIGS
    from retain.methods import METHODS

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    saved = dict(METHODS._items), dict(METHOD_CONFIGS._items), set(sys.modules)
    yield tmp_path
    for registry, items in zip((METHODS, METHOD_CONFIGS), saved[:2], strict=True):
        registry._items.clear()
        registry._items.update(items)
    for name in set(sys.modules) - saved[2]:
        if getattr(sys.modules[name], "__file__", None) and str(tmp_path) in str(sys.modules[name].__file__):
            del sys.modules[name]


def _pages() -> list[str]:
    return sorted(p.name for p in TUTORIALS.glob("*.md"))


def test_every_tutorial_is_tested():
    assert set(_pages()) == {"imagefolder.md", "new-method.md", "deploy.md", "gpu-and-cluster.md"}


def test_the_harness_reads_marks_titles_and_continuations(tmp_path):
    page = tmp_path / "p.md"
    page.write_text('x\n<!-- tutorial: skip (needs a GPU) -->\n```bash\nretain run a \\\n  b=1  # note\n```\n\n'
                    '```python title="m.py"\nx = 1\n```\n')  # fmt: skip
    a, b = blocks(page)
    assert (a.lang, a.mark, a.title, commands(a.code)) == ("bash", "skip", None, ["retain run a  b=1  # note"])
    assert (b.lang, b.mark, b.title) == ("python", None, "m.py")
    assert dry_argv("srun torchrun --nnodes 2 -m retain run x a=1") == ["run", "x", "a=1", "--print-config"]
    assert dry_argv("retain sweep x seed=0,1 --out s") == ["sweep", "x", "seed=0,1", "--out", "s", "--dry-run"]
    assert dry_argv("export MASTER_PORT=29500") is None


def test_imagefolder_tutorial(workdir):
    out = run_page(TUTORIALS / "imagefolder.md", workdir)
    report = workdir / "shapes-report"
    assert (report / "report.html").is_file() and (report / "report.md").is_file()
    assert "simplecil" in out[-1] and "lwf" in out[-1]
    forgetting = {}
    for name in ("finetune", "lwf", "simplecil"):
        record = json.loads((workdir / "runs" / f"shapes-{name}" / "metrics.json").read_text())
        forgetting[name] = record["metrics"]["forgetting"]
    assert forgetting["finetune"] > forgetting["simplecil"]  # the page says fine-tuning forgets, SimpleCIL keeps


def test_new_method_tutorial(workdir):
    out = run_page(TUTORIALS / "new-method.md", workdir)
    assert (workdir / "runs" / "l2-previous" / "metrics.json").is_file()
    assert any("l2_previous" in o for o in out)


def test_deploy_tutorial(workdir):
    for page in [*NEEDS["deploy.md"], "deploy.md"]:
        out = run_page(TUTORIALS / page, workdir)
    assert (workdir / "shapes.safetensors").is_file() and (workdir / "shapes_timm.safetensors").is_file()
    timm_names, retain_names = out[-1].strip().split("] [")  # the page says the two lists agree
    assert timm_names + "]" == "[" + retain_names


def test_gpu_and_cluster_tutorial(workdir):
    out = run_page(TUTORIALS / "gpu-and-cluster.md", workdir)
    assert any("cuda" in o for o in out)  # the GPU box's config was resolved
    assert any("runs" in o and "seed=2" in o for o in out)  # the sweep's runs were listed
