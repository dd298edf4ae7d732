"""``grpc-balance bench`` on the local cluster: the document's shape and the claims that hold on
any machine (spread, new pods served, no lost retryable call). No timing assertions: figures go
into the benchmark's output, not into tests."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from conftest import require

from grpc_balance_mw.cli import STRATEGIES
from grpc_balance_mw.testing import missing_components

pytestmark = pytest.mark.cluster

FIELDS = {
    "name",
    "strategy",
    "calls",
    "errors",
    "error_codes",
    "per_pod",
    "max_share_over_fair",
    "p50_ms",
    "p99_ms",
    "alarm",
    "windows",
}


def bench(*args: str, timeout: float = 120) -> dict[str, dict[str, Any]]:
    """Run the command as a user does; its entries by strategy."""
    return {entry["strategy"]: entry for entry in bench_entries(*args, timeout=timeout)}


def bench_entries(*args: str, timeout: float = 120) -> list[dict[str, Any]]:
    """Run the command as a user does; its entries in order."""
    done = subprocess.run(
        [sys.executable, "-m", "grpc_balance_mw.cli", "bench", "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)  # stdout is the document and nothing else
    assert set(document) >= {"schema", "settings", "scenarios", "machine"}
    assert document["schema"] == 1
    assert document["settings"]["calls"] > 0 and document["settings"]["strategies"]
    assert "scenario" in done.stderr  # progress goes to stderr
    entries: list[dict[str, Any]] = document["scenarios"]
    return entries


def test_steady_every_strategy_with_the_pods_own_counts() -> None:
    require(not missing_components(l7="haproxy"), "haproxy is not installed")
    entries = bench("--scenario", "steady", "--calls", "150", "--rounds", "3")
    assert list(entries) == list(STRATEGIES)  # every strategy, in one invocation, in order
    for strategy, entry in entries.items():
        assert set(entry) >= FIELDS, strategy
        assert "seconds_to_new_pod_traffic" not in entry
        assert entry["name"] == "steady" and entry["windows"] == []  # no event to count from
        assert entry["calls"] == 150 and entry["errors"] == 0, entry
        assert sum(entry["per_pod"].values()) == 150, entry  # the pods' counts, no warm-up
        assert len(entry["per_pod"]) == 3
        assert 0 < entry["p50_ms"] <= entry["p99_ms"]
    assert entries["plain"]["max_share_over_fair"] == 3.0  # one connection, one pod
    assert entries["interceptors"]["max_share_over_fair"] == 3.0
    assert entries["interceptors"]["alarm"] == "pinned"
    assert entries["plain"]["alarm"] is None  # nothing observes it
    for spread in ("balanced", "headless-round-robin", "l7-proxy"):
        assert entries[spread]["max_share_over_fair"] < 1.5, entries[spread]
    assert entries["balanced"]["alarm"] == "balanced"


def test_scale_up_the_balanced_channel_and_the_fallback_reach_the_new_pods() -> None:
    strategies = ("plain", "balanced", "dial-per-request")
    args = [arg for name in strategies for arg in ("--strategy", name)]
    entries = bench("--scenario", "scale-up", "--scale-wait-s", "8", *args)
    assert list(entries) == list(strategies)
    for name, entry in entries.items():
        assert set(entry) >= FIELDS | {"seconds_to_new_pod_traffic"}, name
        assert entry["errors"] == 0, entry
    new_pods = {"charge-points-3", "charge-points-4"}
    assert entries["plain"]["seconds_to_new_pod_traffic"] is None
    assert not new_pods & set(entries["plain"]["per_pod"])
    for name in ("balanced", "dial-per-request"):
        assert entries[name]["seconds_to_new_pod_traffic"] is not None, entries[name]
        assert new_pods & set(entries[name]["per_pod"]), entries[name]
    for entry in entries.values():  # the calls after the scale-up, in 5 s windows
        windows = entry["windows"]
        assert windows and windows[0]["start_s"] == 0.0, entry
        assert sum(sum(w["per_pod"].values()) for w in windows) == sum(entry["per_pod"].values())


def pod_kill(*strategies: str) -> dict[str, dict[str, Any]]:
    args = [arg for name in strategies for arg in ("--strategy", name)]
    return bench("--scenario", "pod-kill", "--calls", "200", *args)


def test_pod_kill_the_fallback_loses_no_retryable_call() -> None:
    entries = pod_kill("plain", "dial-per-request", "balanced-predial")
    for name in ("dial-per-request", "balanced-predial"):
        assert entries[name]["errors"] == 0, entries[name]
        assert entries[name]["calls"] > 0
    killed = entries["plain"]["note"].split()[1]
    for entry in entries.values():
        assert entry["per_pod"].get(killed, 0) < entry["calls"]
        # Windows around the kill: none after it counts a call on the killed pod.
        windows = entry["windows"]
        assert windows[0]["start_s"] < 0 <= windows[-1]["start_s"], entry
        after = [w for w in windows if w["start_s"] >= 0]
        assert not [w for w in after if w["per_pod"].get(killed)], entry


def test_pod_kill_the_balanced_channel_loses_no_retryable_call() -> None:
    entries = pod_kill("balanced")
    assert entries["balanced"]["errors"] == 0, entries["balanced"]
