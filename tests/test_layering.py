"""The direction of imports (the team's design, section 2): nothing imports a layer above it, no circles.

The imports are read from the source with :mod:`ast`, so the check costs no import of torch. Imports
under ``if TYPE_CHECKING:`` are left out: a type-only import runs nothing. Imports inside functions
count, because they run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level packages by layer; each may import its own layer and those below, never one above.
PACKAGE_LAYERS: dict[str, int] = {
    "index": 0,
    "evaluation": 0,
    "training": 1,
    "service": 2,
    "migrations": 2,  # the schema of the service: migrate.py finds it, env.py reads the tables
    "bench": 3,
    "reid_cli": 3,
}

#: Inside ``service``, the same rule between these layers (a module belongs to its longest prefix).
SERVICE_LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "service.db",
        "service.imaging",
        "service.settings",
        "service.settings_errors",
        "service.evaluation_files",
        "service.client",
    ),
    ("service.http",),
    ("service.embedder", "service.gallery_index", "service.item_writer", "service.image_release"),
    ("service.state",),
    ("service.jobs", "service.search", "service.rank_lists"),
    ("service.api",),
    ("service.app",),
    ("service.cli", "service.demo"),
)


def find_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages in :data:`PACKAGE_LAYERS`."""
    found = {}
    for top in PACKAGE_LAYERS:
        if (root / f"{top}.py").is_file():
            found[top] = root / f"{top}.py"
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _longest_module(name: str, modules: set[str] | dict[str, Path]) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _imports(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The modules of ours that the import statements outside ``if TYPE_CHECKING:`` import.

    ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else ``pkg``.
    """
    found: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                pending.extend(child.orelse)
            elif isinstance(child, ast.Import):
                found.update(_longest_module(alias.name, modules) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in modules else _longest_module(base, modules))
            else:
                pending.append(child)
    return found - {"", module}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    modules = find_modules(root)
    return {
        module: _imports(ast.parse(path.read_text()), module, path.name == "__init__.py", modules)
        for module, path in modules.items()
    }


def layer_of(module: str) -> tuple[int, int]:
    """(package layer, service layer) of a module; KeyError for a service module in no layer."""
    top = module.split(".")[0]
    if top != "service" or module == "service":
        return PACKAGE_LAYERS[top], 0
    prefixes = [
        (len(prefix), i)
        for i, layer in enumerate(SERVICE_LAYERS)
        for prefix in layer
        if module == prefix or module.startswith(prefix + ".")
    ]
    if not prefixes:
        raise KeyError(f"{module} belongs to no layer of SERVICE_LAYERS in {__file__}: add it to one")
    return PACKAGE_LAYERS[top], max(prefixes)[1]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"importer -> imported"`` for every import of a module in a higher layer."""
    edges = ((src, dst) for src, targets in graph.items() for dst in targets)
    return sorted(f"{src} -> {dst}" for src, dst in edges if layer_of(dst) > layer_of(src))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(graph):
        if start in order:
            continue
        work = [(start, iter(sorted(graph[start])))]
        order[start] = low[start] = len(order)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == order[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
            elif child not in order:
                order[child] = low[child] = len(order)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], order[child])
    return cycles


def test_no_module_imports_a_layer_above_it() -> None:
    assert upward_imports(import_graph(ROOT)) == []


def test_there_are_no_import_circles() -> None:
    assert import_cycles(import_graph(ROOT)) == []


def test_every_service_module_has_a_layer() -> None:
    for module in import_graph(ROOT):
        layer_of(module)


def test_the_checks_see_upward_imports_circles_and_type_only_imports(tmp_path: Path) -> None:
    files = {
        "index/__init__.py": "",
        "index/base.py": "from training.model import X\n",  # upward
        "training/__init__.py": "",
        "training/model.py": "from . import loop\n",  # a circle with loop.py
        "training/loop.py": "def f():\n    from training.model import X\n",
        "service/__init__.py": "",
        "service/settings.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from service.state import S\n"
        ),
        "service/state.py": "import service.settings\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["index.base -> training.model"]
    assert import_cycles(graph) == [["training.loop", "training.model"]]
    assert graph["service.settings"] == set() and graph["service.state"] == {"service.settings"}
    with pytest.raises(KeyError, match=r"service\.unplaced"):
        layer_of("service.unplaced")
