"""The phenomena the package is about, reproduced on the local cluster with each implementation.

Spread is measured by the pods' own counts (``cluster.served()``), never by the client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from calls import CALL_KINDS, call_sync

from grpc_balance_mw.dns_message import lookup_a
from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

pytestmark = pytest.mark.cluster

Factory = Callable[..., LocalCluster]
FRESH = (("grpc.use_local_subchannel_pool", 1),)
ROUND_ROBIN = (
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.dns_min_time_between_resolutions_ms", 100),
)
L4 = ["userspace", "haproxy", "iptables"]
DNS = ["embedded", "dnsmasq"]


def get(channel: grpc.Channel) -> str | None:
    """One unary call; the pod that says it served it."""
    stub = pb_grpc.ChargePointsStub(channel)
    _, call = stub.GetChargePoint.with_call(pb.GetChargePointRequest(id="cp-1"), timeout=10)
    identity = pod_from_metadata(call.initial_metadata())
    return identity.name if identity else None


def on_one_channel(target: str, calls: int, options: Sequence[tuple[str, Any]] = ()) -> None:
    with grpc.insecure_channel(target, options=list(options)) as channel:
        for _ in range(calls):
            get(channel)


def on_fresh_channels(target: str, channels: int, calls_each: int = 2) -> None:
    for _ in range(channels):
        on_one_channel(target, calls_each, FRESH)


def pods_with_calls(cluster: LocalCluster) -> dict[str, int]:
    return {name: count for name, count in cluster.served().items() if count}


def warm_up(cluster: LocalCluster, channel: grpc.Channel) -> None:
    """Call until round_robin has a connection to every ready pod, then zero the counts."""
    ready = {endpoint.name for endpoint in cluster.endpoints()}
    seen: set[str | None] = set()
    # round_robin only picks READY subchannels, and a channel reusing subchannels from gRPC's
    # global pool may have some still reconnecting: bound by time, not by a count of calls.
    deadline = time.monotonic() + 10
    while not ready <= seen and time.monotonic() < deadline:
        seen.add(get(channel))
    assert ready <= seen, f"round_robin reached only {seen} of {ready}"
    cluster.reset_counts()


@pytest.fixture(params=L4)
def service_cluster(request: pytest.FixtureRequest, local_cluster_factory: Factory) -> LocalCluster:
    return local_cluster_factory(pods=3, service=request.param, dns=None)


@pytest.fixture(params=DNS)
def dns_cluster(request: pytest.FixtureRequest, local_cluster_factory: Factory) -> LocalCluster:
    return local_cluster_factory(pods=3, dns=request.param)


def test_one_channel_through_the_service_puts_every_call_on_one_pod(
    service_cluster: LocalCluster,
) -> None:
    with grpc.insecure_channel(service_cluster.service_target) as channel:
        for _ in range(25):
            for kind in CALL_KINDS:
                assert call_sync(channel, kind).code == grpc.StatusCode.OK

    served = pods_with_calls(service_cluster)
    assert list(served.values()) == [100], served  # exactly 100%, every run: one connection


def test_fresh_connections_through_the_service_reach_every_pod(
    service_cluster: LocalCluster,
) -> None:
    # 30 connections to 3 pods miss one with probability 3 * (2/3)**30 ~ 1.5e-5.
    on_fresh_channels(service_cluster.service_target, channels=30)

    served = service_cluster.served()
    assert all(served.values()), served
    assert sum(served.values()) == 60


def test_channels_with_the_same_options_share_one_connection(
    service_cluster: LocalCluster,
) -> None:
    target = service_cluster.service_target
    shared = [grpc.insecure_channel(target) for _ in range(20)]
    try:
        for channel in shared:
            get(channel)
        assert len(pods_with_calls(service_cluster)) == 1  # gRPC's global subchannel pool
    finally:
        for channel in shared:
            channel.close()


def test_a_local_subchannel_pool_gives_each_channel_its_own_connection(
    service_cluster: LocalCluster,
) -> None:
    own = [grpc.insecure_channel(service_cluster.service_target, list(FRESH)) for _ in range(20)]
    try:
        for channel in own:
            get(channel)
    finally:
        for channel in own:
            channel.close()
    # 20 connections all on one of 3 pods: probability 3 * (1/3)**20 ~ 1e-9.
    assert len(pods_with_calls(service_cluster)) > 1


def test_established_connections_survive_a_scale_event(service_cluster: LocalCluster) -> None:
    with grpc.insecure_channel(service_cluster.service_target) as channel:
        pinned = get(channel)
        service_cluster.scale(5)
        service_cluster.scale(4)
        assert pinned in {pod.name for pod in service_cluster.pods}
        service_cluster.reset_counts()
        for _ in range(20):
            assert get(channel) == pinned  # the connection kept its pod, like a conntrack flow

    assert pods_with_calls(service_cluster) == {pinned: 20}


def test_a_killed_pod_drops_out_of_the_service(service_cluster: LocalCluster) -> None:
    service_cluster.kill("charge-points-1")

    on_fresh_channels(service_cluster.service_target, channels=30)  # no call fails

    served = service_cluster.served()
    assert sorted(served) == ["charge-points-0", "charge-points-2"]
    assert sum(served.values()) == 60
    assert all(served.values()), served


def test_client_ip_affinity_keeps_even_fresh_connections_on_one_pod(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(pods=3, service="iptables", session_affinity="ClientIP")

    on_fresh_channels(cluster.service_target, channels=30)

    served = pods_with_calls(cluster)
    assert list(served.values()) == [60], served  # every connection comes from 127.0.0.1


def test_headless_dns_with_round_robin_spreads_evenly(dns_cluster: LocalCluster) -> None:
    with grpc.insecure_channel(dns_cluster.headless_target, list(ROUND_ROBIN)) as channel:
        warm_up(dns_cluster, channel)
        for _ in range(90):
            get(channel)

    assert dns_cluster.served() == {f"charge-points-{n}": 30 for n in range(3)}


def test_headless_round_robin_misses_a_pod_added_later(dns_cluster: LocalCluster) -> None:
    with grpc.insecure_channel(dns_cluster.headless_target, list(ROUND_ROBIN)) as channel:
        warm_up(dns_cluster, channel)
        dns_cluster.scale(4)
        new = dns_cluster.pods[-1]
        assert new.ip in (lookup_a(dns_cluster.dns_address, dns_cluster.fqdn) or [])
        for _ in range(90):
            get(channel)
        # Nothing made the channel resolve again: no connection dropped.
        assert dns_cluster.served()[new.name] == 0

    with grpc.insecure_channel(dns_cluster.headless_target, list(ROUND_ROBIN)) as channel:
        warm_up(dns_cluster, channel)  # a new channel resolves and reaches all four


def test_a_killed_pod_drops_out_of_dns(dns_cluster: LocalCluster) -> None:
    killed = dns_cluster.pod("charge-points-1")
    with grpc.insecure_channel(dns_cluster.headless_target, list(ROUND_ROBIN)) as channel:
        warm_up(dns_cluster, channel)
        dns_cluster.kill(killed.name)
        assert killed.ip not in (lookup_a(dns_cluster.dns_address, dns_cluster.fqdn) or [])
        # round_robin notices the closed connection itself; retrying covers the call in flight
        # at the moment it did, which is the client's business, not the cluster's.
        for _ in range(60):
            try:
                get(channel)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE
    served = dns_cluster.served()
    assert sorted(served) == ["charge-points-0", "charge-points-2"]
    assert all(served.values()), served


@pytest.mark.parametrize("balance", ["leastconn", "roundrobin"])
def test_the_l7_proxy_spreads_one_channels_calls(
    local_cluster_factory: Factory, balance: str
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None, l7="haproxy", l7_balance=balance)

    on_one_channel(cluster.l7_target, 90)

    served = cluster.served()
    assert all(served.values()), served
    assert sum(served.values()) == 90


def test_a_killed_pod_drops_out_of_the_l7_proxy(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(pods=3, dns=None, l7="haproxy", l7_balance="roundrobin")
    with grpc.insecure_channel(cluster.l7_target) as channel:
        get(channel)
        cluster.kill("charge-points-1")
        cluster.reset_counts()
        for _ in range(60):
            get(channel)  # every call succeeds: HAProxy no longer picks the dead pod

    assert cluster.served() == {"charge-points-0": 30, "charge-points-2": 30}


def test_headless_port_gotcha(local_cluster_factory: Factory) -> None:
    """A headless name resolves to pod IPs, so the Service port there reaches nothing."""
    cluster = local_cluster_factory(pods=2, dns="embedded")
    service_port = int(cluster.service_target.rsplit(":", 1)[1])
    assert service_port != cluster.target_port
    wrong = f"dns://{cluster.dns_address}/{cluster.fqdn}:{service_port}"
    with grpc.insecure_channel(wrong, list(ROUND_ROBIN)) as channel:
        stub = pb_grpc.ChargePointsStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1"), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(cluster.headless_target, list(ROUND_ROBIN)) as channel:
        assert get(channel) in {pod.name for pod in cluster.pods}  # the target port works
