"""The README's first command: the demo runs on the local cluster and shows pinning and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import require

from grpc_balance_mw.testing import missing_components

pytestmark = pytest.mark.cluster


def test_demo_shows_pinning_then_the_fix() -> None:
    require(not missing_components(l7="haproxy"), "haproxy is not installed")
    done = subprocess.run(
        [sys.executable, "-m", "grpc_balance_mw.cli", "demo", "--calls", "300", "--rate", "250"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    sections = done.stdout.split("\n== ")
    service, headless, l7, surge = sections[1:5]
    assert "detector: pinned" in service and " 300  " in service
    assert "detector: balanced" in headless and "detector: l7-balanced" in l7
    assert "300 CLIENT spans, 300 tagged with the pod" in service
    assert "RESOURCE_EXHAUSTED" in surge
    assert "are pinned" in done.stderr  # the rate-limited warning says what to do
