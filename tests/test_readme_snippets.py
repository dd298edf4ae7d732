"""The README's Python snippets, pasted as written, run against a real pod (see
tests/readme_snippets.py for what a reader is assumed to bring)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SyncPod, require

from grpc_balance_mw.testing import missing_components

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _run(target: str, mode: str) -> str:
    env = {**os.environ, "POD_NAME": "charge-points-readme"}  # what the downward API sets
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "readme_snippets.py"), str(ROOT / "README.md"),
         target, mode],
        capture_output=True, text=True, timeout=90, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_readme_snippets_run_as_written(sync_pod: SyncPod) -> None:
    assert "served by a call" in _run(sync_pod.target, "--skip-cluster")


@pytest.mark.cluster
def test_the_readme_local_cluster_snippet_runs_as_written() -> None:
    missing = missing_components(service="haproxy", dns="dnsmasq", l7="nginx")
    require(not missing, "; ".join(missing))
    assert "snippet" in _run("unused:0", "--only-cluster")
