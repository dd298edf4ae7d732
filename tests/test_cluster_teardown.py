"""After every other test (conftest.py runs this file last): nothing they started is left."""

from __future__ import annotations

import os
from pathlib import Path

from grpc_balance_mw.testing import live_children
from grpc_balance_mw.testing.netns import live_namespaces

_OURS = (
    "grpc_balance_mw.testing.charge_points.pod",
    "grpc_balance_mw.testing",
    "haproxy",
    "dnsmasq",
)


def children_of_this_process() -> list[str]:
    """Processes whose parent is this test process and that a local cluster would start."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # it exited while we looked
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and any(marker in cmdline for marker in _OURS):
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_no_cluster_process_or_namespace_is_left() -> None:
    assert live_children() == []
    assert children_of_this_process() == []
    assert live_namespaces() == []
