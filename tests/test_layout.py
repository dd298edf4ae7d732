"""The import graph the package promises: tools sit on top, the library never imports them."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grpc_balance_mw"


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names (the package uses no relative imports)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules_under(*parts: str, exclude: tuple[str, ...] = ()) -> list[Path]:
    base = PACKAGE.joinpath(*parts)
    return [
        path
        for path in sorted(base.rglob("*.py"))
        if not any(path.is_relative_to(PACKAGE / part) for part in exclude)
    ]


def importing(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in paths
        for name in sorted(imports(path))
        if any(name == package or name.startswith(f"{package}.") for package in forbidden)
    ]


def test_the_library_imports_neither_the_harness_nor_the_tools() -> None:
    library = modules_under(exclude=("testing", "cli"))
    assert len(library) > 10
    assert importing(library, ("grpc_balance_mw.testing", "grpc_balance_mw.cli")) == []


def test_the_harness_does_not_import_the_tools() -> None:
    assert importing(modules_under("testing"), ("grpc_balance_mw.cli",)) == []


@pytest.mark.parametrize("name", ["demo", "bench"])
def test_the_old_tool_packages_are_gone(name: str) -> None:
    assert not (PACKAGE / name).exists()


#: The sync adapters; the asyncio ones share the pure core and ``observing`` with them instead.
SYNC_ADAPTERS = (
    "grpc_balance_mw.interceptors",
    "grpc_balance_mw.observed_channel",
    "grpc_balance_mw.observed_methods",
    "grpc_balance_mw.observed_calls",
    "grpc_balance_mw.response_stream",
    "grpc_balance_mw.dial_per_request",
    "grpc_balance_mw.balanced",
    "grpc_balance_mw.routed_channel",
    "grpc_balance_mw.headless_channel",
    "grpc_balance_mw.server",
)
#: The pure core: no gRPC, no OpenTelemetry, no sockets.
PURE = ("affinity", "pool")


@pytest.mark.slow
def test_aio_does_not_import_the_sync_adapters() -> None:
    assert importing(modules_under("aio"), SYNC_ADAPTERS) == []


@pytest.mark.parametrize("part", PURE)
def test_the_pure_core_imports_no_grpc_and_no_opentelemetry(part: str) -> None:
    assert importing(modules_under(part), ("grpc", "opentelemetry", "grpc_health")) == []


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> list[ast.AST]:
    """The bodies of ``if TYPE_CHECKING:`` blocks under ``node``: imports there never run."""
    skipped: list[ast.AST] = []
    for child in ast.walk(node):
        if isinstance(child, ast.If):
            test = child.test
            name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", None)
            if name == "TYPE_CHECKING":
                skipped.extend(child.body)
    return skipped


@functools.cache
def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Which package modules each package module imports, function-level (lazy) imports
    included, ``TYPE_CHECKING`` ones not. ``from a import b`` counts as importing ``a.b`` when
    that is a module, else ``a``; a parent package imported only implicitly does not count."""
    paths = {_module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        tree = ast.parse(path.read_text())
        skipped = {id(node) for block in _type_checking_only(tree) for node in ast.walk(block)}
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in paths)
            elif isinstance(node, ast.ImportFrom) and node.module in paths:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in paths else node.module)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles in ``graph``: one path (first module repeated last) per strongly
    connected part that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    parts: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part: list[str] = []
            while True:
                member = stack.pop()
                part.append(member)
                if member == node:
                    break
            if len(part) > 1:
                parts.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for part in parts:  # a path around the part, for the message
        members = set(part)
        path = [part[0]]
        while True:
            nxt = min(edge for edge in graph[path[-1]] if edge in members)
            if nxt in path:
                found.append([*path[path.index(nxt) :], nxt])
                break
            path.append(nxt)
    return found


def test_the_cycle_finder_sees_lazy_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import B\n")
    (package / "b.py").write_text("def later():\n    from pkg import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text(
        "from typing import TYPE_CHECKING\nimport pkg.a\nif TYPE_CHECKING:\n    import pkg.d2\n"
    )
    (package / "d2.py").write_text("from pkg import d\n")
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    """Arrows point one way: a module never imports, even lazily inside a function, a module
    that imports it back (an import put off to run time hides a cycle, it does not end it)."""
    graph = import_graph()
    assert len(graph) > 50
    assert cycles(graph) == []


def imported_from(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module that importing ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for name in graph[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_aio_does_not_import_the_sync_adapters_even_through_shared_modules() -> None:
    graph = import_graph()
    aio = [name for name in graph if name.startswith("grpc_balance_mw.aio.")]
    assert len(aio) > 5
    reached = {name: sorted(imported_from(graph, name) & set(SYNC_ADAPTERS)) for name in aio}
    assert {name: found for name, found in reached.items() if found} == {}
