"""``grpc-balance bench``'s ``"windows"``: the spread in 5 s windows around a scenario's event,
and the ``scale-down`` scenario (4 -> 3 pods, graceful and SIGKILL) that reports them from the
pods' own counts."""

from __future__ import annotations

import pytest
from test_bench import FIELDS, bench

from grpc_balance_mw.cli.bench import window, windows_of

WINDOW_KEYS = {"start_s", "end_s", "per_pod", "max_share_over_fair"}


def test_calls_are_counted_in_windows_aligned_on_the_event() -> None:
    samples = [(-0.1, "a"), (0.0, "a"), (4.9, "b"), (5.0, "b"), (12.0, "c"), (12.5, "c")]
    windows = windows_of(samples, lambda start: 4 if start < 0 else 3)
    assert [(w["start_s"], w["end_s"]) for w in windows] == [
        (-5.0, 0.0),
        (0.0, 5.0),
        (5.0, 10.0),
        (10.0, 15.0),
    ]
    assert all(set(w) == WINDOW_KEYS for w in windows)
    assert windows[0] == window(-5.0, 0.0, {"a": 1}, 4)
    assert windows[0]["max_share_over_fair"] == 4.0  # all of it on one pod of 4
    assert windows[1]["per_pod"] == {"a": 1, "b": 1}
    assert windows[1]["max_share_over_fair"] == 1.5  # 1 of 2 calls where 3 pods share
    assert windows[3]["per_pod"] == {"c": 2}


def test_a_window_without_calls_has_no_share() -> None:
    assert window(0, 5, {}, 3)["max_share_over_fair"] is None


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(450)  # 4 runs of a 4-pod cluster for 35 s each
def test_scale_down_windows_from_the_pods_own_counts() -> None:
    entries = bench(
        "--scenario", "scale-down", "--strategy", "plain", "--strategy", "balanced", timeout=400
    )
    # bench() keys by strategy: the last variant (sigkill) of each is what it returns.
    for name in ("plain", "balanced"):
        entry = entries[name]
        assert set(entry) >= FIELDS | {"variant"} and entry["variant"] == "sigkill", entry
        assert entry["name"] == "scale-down"
        windows = entry["windows"]
        assert windows and all(set(w) == WINDOW_KEYS for w in windows)
        assert windows[0]["end_s"] == 0.0 and len(windows[0]["per_pod"]) == 4  # before
        assert all(len(w["per_pod"]) <= 3 for w in windows[1:])  # after: a pod left
        assert windows[-1]["end_s"] >= 29.5
    settled = [w for w in entries["balanced"]["windows"] if w["start_s"] >= 9.5]
    assert settled and all(w["max_share_over_fair"] <= 1.25 for w in settled), settled
    assert entries["plain"]["max_share_over_fair"] == 3.0  # one connection, one pod
