"""The import graph the package promises: tools sit on top, the library never imports them."""

from __future__ import annotations

import ast
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
    "grpc_balance_mw.client",
    "grpc_balance_mw.observed_channel",
    "grpc_balance_mw.observed_calls",
    "grpc_balance_mw.response_stream",
    "grpc_balance_mw.redial",
    "grpc_balance_mw.channel",
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
