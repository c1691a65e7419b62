"""The package's shape: no import cycles, a light `import pad_moe_transformers` and `pad-moe --help`,
every public name importable, no absolute path of a machine in the tracked files."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pad_moe_transformers"
# What the Trainer stack and the example datasets pull in; the library and its CLI must not.
HEAVY_MODULES = ("transformers.trainer", "datasets", "pandas", "pyarrow")


# ------------------------------------------------------------------------------------ import graph
@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.where})"


def package_modules(name: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package (packages as their `__init__.py`), found on disk without importing it."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not an importable package"
    modules: dict[str, Path] = {}

    def walk(package: str, folder: Path) -> None:
        modules[package] = folder / "__init__.py"
        for path in sorted(folder.iterdir()):
            if path.is_dir() and (path / "__init__.py").is_file():
                walk(f"{package}.{path.name}", path)
            elif path.suffix == ".py" and path.name != "__init__.py":
                modules[f"{package}.{path.stem}"] = path

    walk(name, Path(next(iter(spec.submodule_search_locations))))
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (
        isinstance(test, ast.Name)
        and test.id == "TYPE_CHECKING"
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth (function-level ones included), except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if _type_checking_only(node):
            children = [c for c in children if c not in node.body]
        stack.extend(children)


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Imports between the package's modules: as written (`from . import x` names module `x` when it is one,
    else the package's `__init__`), plus the parent packages Python runs first (importing `a.b.c` runs
    `a/b/__init__.py`), except the importer's own ancestors, which are already being imported."""
    edges = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        package_parts = module.split(".") if is_package else module.split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _import_nodes(tree):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{node.lineno}"
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package_parts[: len(package_parts) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            for target in dict.fromkeys(targets):
                if target not in modules:
                    continue
                parts = target.split(".")
                for depth in range(2, len(parts)):  # implicit: the target's parent packages
                    parent = ".".join(parts[:depth])
                    if parent in modules and not (module == parent or module.startswith(parent + ".")):
                        edges.append(Edge(module, parent, f"{where}, parent package of {target}"))
                if target != module:
                    edges.append(Edge(module, target, where))
    return edges


def find_cycles(edges: list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each strongly connected component of more than one module (Tarjan), with a shortest cycle through its
    first module (as a list of edges)."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # recursive: the graph has a few dozen nodes
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(component, _cycle_through(component, graph)) for component in components]


def _cycle_through(component: list[str], graph: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle from the component's first module back to it, inside the component (BFS)."""
    members, start = set(component), component[0]
    previous: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members:
                    continue
                if edge.target == start:
                    cycle = [edge]
                    while cycle[0].source != start:
                        cycle.insert(0, previous[cycle[0].source])
                    return cycle
                if edge.target not in previous:
                    previous[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle found in the component {component}")


def test_cycle_finder_reports_the_cycle():
    edges = [Edge("a", "b", "a.py:1"), Edge("b", "c", "b.py:3"), Edge("c", "a", "c.py:9"), Edge("c", "d", "c.py:2")]
    ((component, cycle),) = find_cycles(edges)
    assert component == ["a", "b", "c"]
    assert [str(e) for e in cycle] == ["a -> b  (a.py:1)", "b -> c  (b.py:3)", "c -> a  (c.py:9)"]
    assert find_cycles([Edge("a", "b", ""), Edge("b", "c", "")]) == []


def test_edges_resolve_relative_and_function_level_imports(tmp_path, monkeypatch):
    package = tmp_path / "fixture_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n"
    )
    (package / "sub" / "b.py").write_text("import fixture_pkg.a\nfrom .. import __version__\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    edges = {(e.source, e.target) for e in import_edges(package_modules("fixture_pkg"))}
    assert edges == {
        ("fixture_pkg", "fixture_pkg.a"),
        ("fixture_pkg.a", "fixture_pkg.sub.b"),  # function-level
        ("fixture_pkg.a", "fixture_pkg.sub"),  # implicit: sub/__init__.py runs first
        ("fixture_pkg.sub.b", "fixture_pkg.a"),
        ("fixture_pkg.sub.b", "fixture_pkg"),  # `from .. import name`: the package's __init__
    }  # the TYPE_CHECKING import of sub/__init__.py is no edge


def test_no_import_cycles():
    modules = package_modules()
    assert len(modules) > 20
    edges = import_edges(modules)
    cycles = find_cycles(edges)
    report = []
    for component, cycle in cycles:
        inside = [e for e in edges if e.source in component and e.target in component]
        report.append(
            f"{len(component)} modules import each other: {', '.join(component)}\n"
            "e.g. the cycle\n  "
            + "\n  ".join(map(str, cycle))
            + "\nall imports among them:\n  "
            + "\n  ".join(map(str, inside))
        )
    assert not cycles, f"import cycles in {PACKAGE} (function-level imports included):\n\n" + "\n\n".join(report)


# ------------------------------------------------------------------------------------ import cost
def _heavy_modules_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; it must leave its result in `result`. Returns the result and
    which of `HEAVY_MODULES` got imported."""
    script = (
        f"import json, sys\n{code}\n"
        f"print(json.dumps({{'result': result, 'heavy': [m for m in {HEAVY_MODULES!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_does_not_load_the_trainer_stack():
    out = _heavy_modules_after(
        "import transformers, pad_moe_transformers as pmt\n"
        "result = transformers.AutoConfig.for_model('pad_moe').__class__.__name__"
    )
    assert out["result"] == "PADMoEConfig"  # the Auto classes are registered at import
    assert out["heavy"] == [], f"`import {PACKAGE}` imports {out['heavy']}"


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["inspect", "--help"], ["analyze", "--help"]])
def test_cli_help_does_not_load_the_trainer_stack(argv):
    out = _heavy_modules_after(
        "import contextlib, io\nfrom pad_moe_transformers.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()) as text:\n    code = main({argv!r})\n"
        "result = [code, text.getvalue()]"
    )
    code, text = out["result"]
    assert code == 0 and "usage: pad-moe" in text
    assert out["heavy"] == [], f"`pad-moe {' '.join(argv)}` imports {out['heavy']}"


def test_every_public_name_resolves():
    import pad_moe_transformers as pmt
    from pad_moe_transformers import IMPTrainerCallback, pad_optimizer_grouped_parameters
    from pad_moe_transformers.callbacks import IMPTrainerCallback as direct
    from pad_moe_transformers.training import pad_optimizer_grouped_parameters as direct_groups

    assert IMPTrainerCallback is direct and pad_optimizer_grouped_parameters is direct_groups
    missing = [name for name in pmt.__all__ if not hasattr(pmt, name)]
    assert not missing, f"listed in __all__ but not importable: {missing}"
    assert set(pmt.__all__) <= set(dir(pmt))
    with pytest.raises(AttributeError, match="no_such_name"):
        pmt.no_such_name  # noqa: B018


def test_core_never_imports_glue():
    """GLUE (tasks, TSVs, metrics) is for the examples and the CLI only."""
    modules = package_modules()
    users = sorted(
        {e.source for e in import_edges(modules) if e.target.startswith(f"{PACKAGE}.glue")}
        - {m for m in modules if m.startswith((f"{PACKAGE}.glue", f"{PACKAGE}.cli"))}
    )
    assert not users, f"the core imports the GLUE helpers: {users}"


# ------------------------------------------------------------------------------------ portable paths
MACHINE_PATHS = ("/" + "work" + "/", "/" + "root" + "/")  # spelled apart so this file does not match itself


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_tracked_files_hold_no_absolute_machine_paths():
    files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, check=True).stdout.split(b"\0")
    hits = []
    for name in filter(None, files):
        path = ROOT / name.decode()
        if not path.is_file():
            continue  # deleted in the working tree
        data = path.read_bytes()
        if b"\0" in data[:4096]:
            continue  # binary
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if any(p in line for p in MACHINE_PATHS):
                hits.append(f"{name.decode()}:{number}: {line.strip()[:120]}")
    assert not hits, (
        "absolute paths of a machine in tracked files (use paths relative to the repository):\n" + "\n".join(hits)
    )
