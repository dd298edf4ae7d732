"""``observe(channel, rebalance=Rebalance(factory))``: a channel the user cannot change how it is
made, pinned behind an L4 Service, moves its calls onto lanes when the alarm comes (or at once),
through the stubs made before the move, for every call kind."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from calls import CALL_KINDS, call_sync

from grpc_balance_mw import ObserveOptions, observe
from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

Factory = Callable[..., LocalCluster]
pytestmark = pytest.mark.cluster


def _factory(target: str) -> Callable[[Sequence[tuple[str, Any]]], grpc.Channel]:
    return lambda extra: grpc.insecure_channel(target, options=list(extra))


def _until(condition: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("when", ["alarm", "always"])
def test_a_pinned_channel_moves_its_calls_onto_lanes(
    local_cluster_factory: Factory, when: str
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None)
    target = cluster.service_target
    options = ObserveOptions(expected_pods=3, registry=AffinityRegistry(AffinityConfig(warmup_s=0)))
    rebalance = Rebalance(_factory(target), when=when, check_interval_s=0.02)  # type: ignore[arg-type]
    with observe(grpc.insecure_channel(target), options, rebalance=rebalance) as channel:
        stub = pb_grpc.ChargePointsStub(channel)  # made before any move
        request = pb.GetChargePointRequest(id="cp-1")
        rebalancer = channel.rebalancer
        assert rebalancer is not None
        if when == "alarm":
            for _ in range(2000):  # bounded: the alarm comes within the first few dozen
                stub.GetChargePoint(request, timeout=5)
                if rebalancer.balanced is not None:
                    break
            before = cluster.served()
            assert sorted(before.values()).count(0) == 2, before  # it really was pinned
        balanced: Any = rebalancer.balanced
        assert balanced is not None
        _until(
            lambda: len({lane.pod for lane in balanced.pool.lanes if lane.is_available()}) == 3,
            f"lanes never covered the 3 pods: {balanced.pool!r}",
        )
        cluster.reset_counts()
        for _ in range(90):
            stub.GetChargePoint(request, timeout=5)
        for kind in CALL_KINDS:  # every kind goes through the moved methods
            assert call_sync(channel, kind).code is grpc.StatusCode.OK
    served = cluster.served()
    assert all(served[pod.name] > 0 for pod in cluster.pods), served
    assert max(served.values()) < 0.6 * sum(served.values()), served


def test_the_move_needs_a_factory_and_a_known_trigger() -> None:
    with pytest.raises(ConfigurationError):
        Rebalance(factory=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Rebalance(_factory("x:1"), when="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Rebalance(_factory("x:1"), check_interval_s=0)


def test_without_an_alarm_calls_stay_on_the_channel(sync_pod: Any) -> None:
    options = ObserveOptions(registry=AffinityRegistry())
    rebalance = Rebalance(_factory(sync_pod.target), check_interval_s=0.02)
    with observe(grpc.insecure_channel(sync_pod.target), options, rebalance=rebalance) as channel:
        for _ in range(30):
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
        time.sleep(0.1)  # a negative claim: the watcher (every 0.02 s) had five looks at it
        assert channel.rebalancer is not None and channel.rebalancer.balanced is None
