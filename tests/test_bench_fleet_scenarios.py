"""``grpc-balance bench``'s fleet-grade scenarios (slow-pod, hung-pod, fleet), the
``balanced-p2c`` strategy, the ``ejections`` every balanced entry reports, and the local
cluster's pause/resume they rest on. Short runs; the properties hold on any machine; figures
go to the benchmark's output (docs/benchmarks.md), not into tests."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from conftest import SyncPod, require
from test_bench import FIELDS, bench

from grpc_balance_mw.cli.bench_fleet import (
    capacity_shares,
    hung_figures,
    merged_ejections,
    result_of,
)
from grpc_balance_mw.cli.strategies import Targets, channel_for, ejections_of
from grpc_balance_mw.pool import LanePool, LeastOutstanding
from grpc_balance_mw.pool.outliers import OutlierDetection, OutlierEjector
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

# -- the pure parts ---------------------------------------------------------------------------


def test_capacity_shares_weigh_each_pod_by_the_calls_it_can_serve() -> None:
    shares = capacity_shares({"a": 50.0, "b": 50.0, "c": 100.0}, 4)
    assert shares == {"a": 0.4, "b": 0.4, "c": 0.2}


def test_hung_figures_count_the_failures_and_slow_calls_after_the_hang() -> None:
    calls = [
        (9.0, 500.0, None),  # failed before the hang (ended at 9.5)
        (9.8, 1000.0, None),  # in flight at the hang, failed 0.8 s after it
        (10.5, 2500.0, "p1"),  # slow, answered
        (12.0, 1000.0, None),  # failed 3 s after it
        (13.0, 10.0, "p1"),
    ]
    figures = hung_figures(calls, hung_at=10.0)
    assert figures == {
        "failed_after_hang": 2,
        "last_failure_after_hang_s": 3.0,
        "slow_calls_after_hang": 1,
    }
    assert hung_figures(calls[:1], hung_at=10.0)["last_failure_after_hang_s"] is None


def test_the_clients_calls_make_one_consistent_entry() -> None:
    outcomes: list[dict[str, Any]] = [
        {
            "calls": [[0.1, 5.0, "p0", None], [0.2, 7.0, "p1", None], [6.0, 5000.0, None, "X"]],
            "unanswered": 1,
            "ejections": {"count": 1, "pods": {"p1": 1}},
        },
        {"calls": [[0.3, 9.0, "p0", None]], "unanswered": 0, "ejections": None},
    ]
    result = result_of("fleet", "balanced", outcomes, 2)
    assert result.calls == 5 and result.errors == 2
    assert result.error_codes == {"X": 1, "UNKNOWN": 1}
    assert result.per_pod == {"p0": 2, "p1": 1}
    assert sum(result.per_pod.values()) == result.calls - result.errors
    assert result.figures["calls_per_client"] == [4, 1]
    assert sum(sum(w["per_pod"].values()) for w in result.windows) == 3
    assert result.ejections == {"count": 1, "pods": {"p1": 1}}
    assert merged_ejections([{"ejections": None}]) is None


def test_the_ejector_counts_its_ejections_per_pod() -> None:
    ejector = OutlierEjector(OutlierDetection(consecutive_failures=2))
    assert ejector.failed_in_row("p1", 2, True, 3, now=0.0)
    ejector.sweep(100.0, {"p1": (10, 0), "p2": (10, 0), "p3": (10, 0)})  # p1 returns
    assert ejector.failed_in_row("p1", 2, True, 3, now=101.0)
    assert ejector.ejections == 2
    assert ejector.ejected_pods == {"p1": 2}


# -- the strategies ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["balanced", "balanced-p2c"])
def test_balanced_p2c_keeps_least_outstanding_and_both_report_ejections(
    sync_pod: SyncPod, strategy: str
) -> None:
    channel, _detector = channel_for(strategy, Targets(f"127.0.0.1:{sync_pod.port}"))
    try:
        pool = channel.pool  # type: ignore[attr-defined]
        if strategy == "balanced-p2c":
            assert type(pool.picker) is LeastOutstanding
        else:  # the channel's default, whatever it is
            assert type(pool.picker) is type(LanePool().picker)
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1"), timeout=5)
        assert ejections_of(channel) == {"count": 0, "pods": {}}
    finally:
        channel.close()
    plain = grpc.insecure_channel(f"127.0.0.1:{sync_pod.port}")
    assert ejections_of(plain) is None
    plain.close()


# -- on the local cluster -------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.slow
def test_a_paused_pod_hangs_and_runs_on_after_resume() -> None:
    require(not missing_components(), "; ".join(missing_components()))
    with LocalCluster(1, dns=None) as cluster:
        pod = cluster.pods[0]
        pid = pod.pid
        channel = grpc.insecure_channel(pod.address)
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.GetChargePoint(pb.GetChargePointRequest(id="before"), timeout=5)
            cluster.pause(pod.name)
            try:
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetChargePoint(pb.GetChargePointRequest(id="hung"), timeout=0.5)
                assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                assert pod.alive and pod.ready  # hung, not gone: still an endpoint
            finally:
                cluster.resume(pod.name)
            reply = stub.GetChargePoint(pb.GetChargePointRequest(id="after"), timeout=5)
            assert reply.served_by == pod.name and pod.pid == pid  # the same process ran on
        finally:
            channel.close()


def _strategies(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--strategy", name)]


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gray_failure_the_balanced_entry_reports_the_ejected_pod() -> None:
    entries = bench(
        "--scenario", "gray-failure", "--calls", "150", "--rounds", "3",
        *_strategies("plain", "balanced"),
    )  # fmt: skip
    assert entries["plain"]["ejections"] is None
    ejections = entries["balanced"]["ejections"]
    assert ejections["count"] >= 1 and set(ejections["pods"]) == {"charge-points-1"}, ejections


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slow_pod_client_processes_and_the_slow_pods_share() -> None:
    entries = bench(
        "--scenario", "slow-pod", "--run-s", "8", "--clients", "2",
        *_strategies("plain", "balanced"), timeout=280,
    )  # fmt: skip
    assert list(entries) == ["plain", "balanced"]
    for name, entry in entries.items():
        assert set(entry) >= FIELDS | {"ejections", "share_after_settled"}, name
        assert entry["clients"] == 2 and all(n > 0 for n in entry["calls_per_client"]), entry
        assert entry["calls"] == sum(entry["calls_per_client"])
        assert sum(entry["per_pod"].values()) == entry["calls"] - entry["errors"], entry
        assert entry["capacity_share"][entry["slow_pod"]] == pytest.approx(0.2)
    assert entries["plain"]["ejections"] is None
    balanced = entries["balanced"]
    assert balanced["ejections"] == {"count": 0, "pods": {}}
    assert balanced["errors"] == 0, balanced
    slow = balanced["slow_pod"]
    fast = [pod for pod in balanced["capacity_share"] if pod != slow]
    for pod in fast:  # the slow pod holds its calls longer: it is picked less
        assert balanced["per_pod"][slow] < balanced["per_pod"][pod], balanced["per_pod"]
    after = balanced["per_pod_after_settled"]
    assert balanced["slow_share_over_capacity_share"] == pytest.approx(
        after[slow] / sum(after.values()) / 0.2, abs=0.01
    )


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_hung_pod_the_pod_is_resumed_and_the_plain_channel_fails_on() -> None:
    entries = bench(
        "--scenario", "hung-pod", "--run-s", "6", *_strategies("plain", "balanced"), timeout=280
    )  # fmt: skip
    for name, entry in entries.items():
        assert set(entry) >= FIELDS | {"ejections", "last_failure_after_hang_s"}, name
        assert entry["hung_pod_answered_after_resume"] is True, entry  # SIGCONT, ran on
        assert sum(entry["per_pod"].values()) == entry["calls"] - entry["errors"], entry
        after = [w for w in entry["windows"] if w["start_s"] >= 0]
        assert not [w for w in after if w["per_pod"].get(entry["hung_pod"])], entry
    plain = entries["plain"]  # pinned to the hung pod: its calls fail until the end
    assert plain["failed_after_hang"] > 0 and plain["last_failure_after_hang_s"] > 2, plain
    assert entries["balanced"]["ejections"] is not None


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fleet_every_client_process_calls_with_at_most_4_lanes() -> None:
    entries = bench(
        "--scenario", "fleet", "--run-s", "6", "--clients", "3",
        *_strategies("plain", "balanced"), timeout=280,
    )  # fmt: skip
    for name, entry in entries.items():
        assert set(entry) >= FIELDS | {"ejections", "connections_per_pod"}, name
        assert entry["clients"] == 3 and all(n > 0 for n in entry["calls_per_client"]), entry
        assert sum(entry["per_pod"].values()) == entry["calls"] - entry["errors"], entry
        assert sum(sum(w["per_pod"].values()) for w in entry["windows"]) == sum(
            entry["per_pod"].values()
        )
    assert entries["plain"]["lanes_per_client_max"] is None
    assert entries["plain"]["lanes_moved"] is None
    balanced = entries["balanced"]
    assert 1 <= balanced["lanes_per_client_max"] <= 4, balanced
    # No subset rule on "balanced": nothing moved, left or was redialled for the pods' counts.
    assert balanced["lanes_moved"] == balanced["lanes_left_crowded"] == 0
    assert balanced["dials_redialled_crowded"] == 0
    connections = balanced["connections_per_pod"]
    assert len(connections) == 6 and 3 <= sum(connections.values()) <= 3 * 4, connections
    assert balanced["ejections"] is not None
