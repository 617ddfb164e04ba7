"""The package layout follows the data flow: no module imports from a later stage (see renderer/__init__.py)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import renderer

STAGES = [
    (
        "renderer",
        "renderer.config",
        "renderer.decay",
        "renderer.errors",
        "renderer.commands",
        "renderer.children",
        "renderer.logs",
        "renderer.status",
    ),
    ("renderer.haproxy",),
    ("renderer.source",),
    ("renderer.render",),
    ("renderer.deliver",),
    ("renderer.registration",),
    ("renderer.wakeups", "renderer.loop", "renderer.runner", "renderer.cli", "renderer.__main__"),
]
PACKAGE = Path(renderer.__file__).parent


def stage_of(module: str) -> int:
    """The index of the most specific stage prefix that names `module`."""
    best, length = -1, -1
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "renderer" and module.startswith(prefix + "."))
            if matches and len(prefix) > length:
                best, length = index, len(prefix)
    if best < 0 and module == "renderer":
        return 0
    assert best >= 0, f"{module} is in no stage: add it to STAGES and to the map in renderer/__init__.py"
    return best


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_module_imports_from_a_later_stage() -> None:
    wrong = []
    for name, path in sorted(modules().items()):
        for imported in sorted(imports_of(path)):
            if imported.split(".")[0] != "renderer":
                continue
            if stage_of(imported) > stage_of(name):
                wrong.append(f"{name} (stage {stage_of(name)}) imports {imported} (stage {stage_of(imported)})")
    assert not wrong, "\n".join(wrong)


def test_the_product_never_imports_the_lab_or_the_tests() -> None:
    for name, path in modules().items():
        assert not {i.split(".")[0] for i in imports_of(path)} & {"lab", "tests", "bench"}, name


def test_every_module_is_in_a_stage_and_the_map_names_every_folder() -> None:
    for name in modules():
        stage_of(name)
    docstring = renderer.__doc__ or ""
    for folder in ("haproxy/", "source/", "render/", "deliver/", "registration/"):
        assert folder in docstring


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of `files` it imports, `if TYPE_CHECKING:` imports included (ast.walk
    visits them like any other); `from pkg import mod` counts as importing `pkg.mod`."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
                edges.update(t for t in targets if t in files)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in files)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that comes back to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_not_even_under_type_checking() -> None:
    cycle = find_cycle(import_graph(modules()))
    assert cycle is None, " → ".join(cycle or [])


def test_a_type_checking_cycle_is_caught(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("from pkg.b import B\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\nclass B: ...\n"
    )
    graph = import_graph({"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"})
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_the_readme_walk_of_one_change_names_functions_that_exist() -> None:
    """Each `Class.method` or `function` the README's walk names is defined in the package."""
    readme = (PACKAGE.parent / "README.md").read_text()
    walk = readme.split("**One change, from Consul to HAProxy**", 1)[1].split("\n\n", 2)[1]
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)`", walk))
    defined: set[str] = set()
    for path in modules().values():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        defined.add(f"{node.name}.{item.name}")
                    elif isinstance(item, ast.Assign):  # enum members
                        defined.update(f"{node.name}.{t.id}" for t in item.targets if isinstance(t, ast.Name))
    wanted = {n for n in names if n[0].isupper() or "." in n or (n.islower() and "_" in n)}
    wanted -= {"health.service", "web", "add_server"}
    missing = sorted(n for n in wanted if n not in defined and not n.endswith(".py"))
    assert len(wanted) > 15 and not missing, missing
