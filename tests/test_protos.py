"""The checked-in stubs match protos/ (so nobody ships stubs from a stale .proto)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from conftest import require

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    require(importlib.util.find_spec("grpc_tools") is not None, "grpcio-tools not installed")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from generate_protos import generate
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    fresh = sorted(tmp_path.rglob("*_pb2*.py*"))
    assert fresh, "protoc generated nothing"
    for path in fresh:
        checked_in = ROOT / path.relative_to(tmp_path)
        assert checked_in.exists(), f"{checked_in} missing: run python scripts/generate_protos.py"
        assert checked_in.read_text() == path.read_text(), (
            f"{checked_in} is stale: run python scripts/generate_protos.py"
        )


def test_stubs_import_from_the_installed_package() -> None:
    from grpc_balance_mw.demo.v1 import charge_points_pb2_grpc

    assert hasattr(charge_points_pb2_grpc, "ChargePointsStub")
