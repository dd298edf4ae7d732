"""The checked-in stubs match protos/ and load on every grpcio and protobuf the package allows.

The stubs come from the pinned grpcio-tools (scripts/generate_protos.py); the dev venv has the
newest one, whose output differs in form but not in substance. So this compares what both
describe: the serialized FileDescriptorProto and the service methods. The byte-for-byte check
with the pinned generator is ``scripts/generate_protos.py --check`` (scripts/test_floors.sh
runs it, in a venv of its own).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import require
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "grpc_balance_mw" / "testing" / "charge_points" / "v1"
sys.path.insert(0, str(ROOT / "scripts"))
import generate_protos  # noqa: E402

sys.path.pop(0)

MODULES = ("charge_points", "pod_admin")


def serialized_descriptor(path: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto a _pb2.py registers, read from its source (not imported)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            (argument,) = node.args
            assert isinstance(argument, ast.Constant) and isinstance(argument.value, bytes)
            return descriptor_pb2.FileDescriptorProto.FromString(argument.value)
    raise AssertionError(f"{path} registers no descriptor")


def method_paths(path: Path) -> list[str]:
    """The method paths a _pb2_grpc.py's stubs and servicers use, in order."""
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("/chargepoints.v1.")
    ]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require(importlib.util.find_spec("grpc_tools") is not None, "grpcio-tools not installed")
    out = tmp_path_factory.mktemp("stubs")
    generate_protos.generate(out)
    return out / STUBS.relative_to(ROOT)


@pytest.mark.parametrize("name", MODULES)
def test_checked_in_stubs_describe_the_protos(fresh: Path, name: str) -> None:
    assert serialized_descriptor(STUBS / f"{name}_pb2.py") == serialized_descriptor(
        fresh / f"{name}_pb2.py"
    ), f"{name}_pb2.py is stale: run python scripts/generate_protos.py"
    assert method_paths(STUBS / f"{name}_pb2_grpc.py") == method_paths(
        fresh / f"{name}_pb2_grpc.py"
    ), f"{name}_pb2_grpc.py is stale: run python scripts/generate_protos.py"
    assert (STUBS / f"{name}_pb2.pyi").exists()


@pytest.mark.parametrize("name", MODULES)
def test_stubs_come_from_the_pinned_old_generator(name: str) -> None:
    """Newer generators write code that older runtimes refuse: a version check in _pb2_grpc,
    ``_registered_method`` arguments, and protobuf gencode that checks the runtime version."""
    grpc_module = (STUBS / f"{name}_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION" not in grpc_module
    assert "_registered_method" not in grpc_module
    assert "ValidateProtobufRuntimeVersion" not in (STUBS / f"{name}_pb2.py").read_text()


def test_stubs_import_from_the_installed_package() -> None:
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2, charge_points_pb2_grpc

    assert hasattr(charge_points_pb2_grpc, "ChargePointsStub")
    assert charge_points_pb2.DESCRIPTOR.package == "chargepoints.v1"
