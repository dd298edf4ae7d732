"""The modules renamed after what they serve keep their old names for one release: importing an
old name warns, and every name is the new module's own object."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

RENAMED = {
    "grpc_balance_mw.channel": "grpc_balance_mw.balanced",
    "grpc_balance_mw.aio.channel": "grpc_balance_mw.aio.balanced",
    "grpc_balance_mw.redial": "grpc_balance_mw.dial_per_request",
    "grpc_balance_mw.aio.redial": "grpc_balance_mw.aio.dial_per_request",
    "grpc_balance_mw.client": "grpc_balance_mw.interceptors",
    "grpc_balance_mw.aio.client": "grpc_balance_mw.aio.interceptors",
}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_module_name_warns_and_gives_the_new_modules_names(
    old: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=RENAMED[old]):
        shim = importlib.import_module(old)
    new = importlib.import_module(RENAMED[old])
    names = [name for name in dir(new) if not name.startswith("__")]
    assert names and set(names) <= set(dir(shim))
    for name in names:
        assert getattr(shim, name) is getattr(new, name), name
    with pytest.raises(AttributeError):
        shim.no_such_name  # noqa: B018


def test_the_package_itself_imports_no_old_name() -> None:
    """Nothing in the package warns on its own import: it uses the new names."""
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning); "
        "import grpc_balance_mw, grpc_balance_mw.aio, grpc_balance_mw.cli, grpc_balance_mw.testing"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_affinity_lane_keeps_its_old_name_with_a_warning() -> None:
    from grpc_balance_mw.affinity import lanes

    with pytest.warns(DeprecationWarning, match="LaneEvidence"):
        assert lanes.Lane is lanes.LaneEvidence
    with pytest.raises(AttributeError):
        lanes.NoSuchLane  # noqa: B018
