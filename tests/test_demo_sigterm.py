"""SIGTERM (what ``timeout``, CI and systemd send) to ``grpc-balance demo`` ends everything the
local cluster started, as Ctrl-C does: haproxy, the pods, and their temp directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require

from grpc_balance_mw.testing import missing_components

pytestmark = pytest.mark.cluster


def _children(pid: int) -> dict[int, list[str]]:
    """The live (not zombie) child processes of ``pid``: their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(pid) and not fields["State"].startswith("Z"):
            found[int(entry.name)] = [part.decode() for part in cmdline if part]
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sigterm_to_the_demo_stops_haproxy_and_removes_its_directory(tmp_path: Path) -> None:
    missing = missing_components("haproxy")
    require(not missing, "; ".join(missing))
    chart = str(tmp_path / "demo.png")
    demo = subprocess.Popen(
        [sys.executable, "-m", "grpc_balance_mw.cli", "demo", "--l4", "haproxy", "--chart", chart],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    children: dict[int, list[str]] = {}
    workdir: Path | None = None
    try:

        def haproxy_up() -> bool:
            children.update(_children(demo.pid))
            return any(Path(argv[0]).name == "haproxy" for argv in children.values())

        assert _wait(haproxy_up, 60), f"no haproxy under the demo: {children}"
        haproxy = next(pid for pid, argv in children.items() if Path(argv[0]).name == "haproxy")
        config = Path(children[haproxy][children[haproxy].index("-f") + 1])
        workdir = config.parent
        assert workdir.name.startswith("grpc-balance-") and workdir.is_dir()
        os.kill(demo.pid, signal.SIGTERM)
        code = demo.wait(30)
        assert _wait(lambda: not _alive(haproxy), 10), "haproxy outlived the demo"
        left = [pid for pid in children if _alive(pid)]
        assert left == [], {pid: children[pid] for pid in left}
        assert not workdir.exists(), sorted(workdir.iterdir())
        assert code == 128 + signal.SIGTERM  # ended by the signal, after the clean-up
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        for pid in children:  # only when the test failed: what the demo left behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if workdir is not None and workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)
        assert demo.stderr is not None
        demo.stderr.close()
