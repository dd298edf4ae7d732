"""examples/omni_client.py in each mode against a local 3-pod cluster: the plain observed channel
stays pinned (and says so), every fix spreads the calls over the pods."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "omni_client.py"
pytestmark = pytest.mark.cluster


def _served(mode: str, calls: int = 300) -> tuple[dict[str, int], str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--mode", mode, "--local-cluster", "--calls", str(calls)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    served = {line.split()[0]: int(line.split()[1]) for line in done.stdout.splitlines()}
    assert sum(served.values()) == calls
    return served, done.stderr


def test_observing_alone_shows_the_pinning_and_names_the_fix() -> None:
    served, log = _served("observe")
    assert len(served) == 1
    assert "pinned" in log and "balanced_channel" in log


@pytest.mark.parametrize("mode", ["rebalance", "balanced", "dial-per-request", "headless"])
def test_every_fix_reaches_every_pod(mode: str) -> None:
    # rebalance moves after the alarm (a few dozen calls) and its lanes need a moment to cover
    # three distinct pods: give it a thousand calls (about a second).
    served, _ = _served(mode, 1000 if mode == "rebalance" else 300)
    assert len(served) == 3, served
