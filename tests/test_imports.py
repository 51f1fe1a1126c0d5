"""Import hygiene: the config layer loads no model code, and retain's modules import each other without a cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "retain"


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_config_and_package_import_without_torch_or_timm():
    out = _python(
        "import sys, retain, retain.config, retain.registry\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'retain.methods', 'retain.models') if m in sys.modules)\n"
        "print(heavy)"
    )
    assert out.strip() == "[]"


def test_fresh_interpreter_loads_a_method_config_by_name():
    out = _python(
        "from retain.config import RunConfig, load_config\n"
        "cfg = load_config(None, ['method.name=lwf', 'method.lamb=2'])\n"
        "print(cfg.method.name, cfg.method.lamb, RunConfig().method.name)"
    )
    assert out.split() == ["lwf", "2.0", "finetune"]


def test_fresh_interpreter_lists_every_method_for_an_unknown_name():
    out = _python(
        "from retain.config import ConfigError, load_config\n"
        "try:\n    load_config(None, ['method.name=nope'])\nexcept ConfigError as e:\n    print(e)"
    )
    assert out.startswith("method.name: unknown method 'nope'; valid names: ")
    from retain.methods import method_names

    assert out.strip().endswith(", ".join(method_names()))  # every registered method, though none was imported


def test_public_names_resolve():
    import retain

    for name in retain.__all__:
        assert getattr(retain, name) is not None, name
    assert retain.create_method is not None and retain.load_config(None).method.name == "finetune"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        retain.nope  # noqa: B018


def test_reports_and_sweeps_import_without_torch_and_reports_without_sweeps():
    out = _python(
        "import sys, retain.report\n"
        "print('retain.sweep' in sys.modules)\n"
        "import retain.runindex, retain.sweep\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'retain.data', 'retain.engine') if m in sys.modules)\n"
        "print(heavy)"
    )
    assert out.split() == ["False", "[]"]


@pytest.mark.parametrize("module", ["retain/config.py", "retain/registry.py", "retain/runindex.py"])
def test_config_layer_imports_only_stdlib_yaml_and_registry(module):
    allowed = set(sys.stdlib_module_names) | {"yaml", "retain", "retain.registry"}
    for node in ast.walk(ast.parse((ROOT / module).read_text())):  # functions included
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name in allowed or name.split(".")[0] in sys.stdlib_module_names, f"{module} imports {name}"


# ------------------------------------------------------------------------------------------- module-level cycles


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported: not in functions, not under ``if TYPE_CHECKING``."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level_imports(node.body)
            yield from _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _module_level_imports(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            yield from _module_level_imports(node.body)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the retain modules its module-level imports start (a package is its ``__init__``).

    ``from P import x`` is an edge to ``P`` and, where ``P.x`` is a module, to ``P.x``; ``import a.b.c`` an edge to
    ``a.b.c``; each also to the packages above the target (their ``__init__`` runs first). Packages above the
    importing module are skipped when only a submodule is taken from them: they are always initialised first, which
    closes no cycle; a name taken from one of them is an edge like any other.
    """
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        ancestors = {module.rsplit(".", i)[0] for i in range(module.count(".") + (1 if is_package else 0) + 1)}
        ancestors.add(module)
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.Import):
                targets = [(a.name, False) for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = module if is_package else module.rsplit(".", 1)[0]
                    package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{package}.{base}" if base else package
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                names_from_base = len(subs) < len(node.names)  # something other than a submodule is taken
                targets = [(s, False) for s in subs] + [(base, names_from_base)]
            for target, takes_names in targets:
                if target in files and target != module and (takes_names or target not in ancestors):
                    edges.add(target)
                parents = {target.rsplit(".", i)[0] for i in range(1, target.count(".") + 1)}
                edges.update(p for p in parents - ancestors if p in files)  # run before the target itself
        graph[module] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_module_level_imports_have_no_cycle():
    cycle = _find_cycle(_import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    graph = _import_graph()
    graph["retain.config"] = graph["retain.config"] | {"retain.methods"}  # what a top-level import would do
    cycle = _find_cycle(graph)  # e.g. config -> methods -> methods.base -> data.scenarios -> config
    assert cycle[0] == cycle[-1] and {"retain.config", "retain.methods"} <= set(cycle)
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
