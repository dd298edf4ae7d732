"""The iptables Service with the cluster DNS and the L7 proxy: the host reaches pods in the netns.

The pods run inside the harness's network namespace (kube-proxy's rules live there); each pod's
own ip:port is forwarded from the host, so the headless Service's A records and the L7 proxy's
upstreams reach them as in a routed pod network, while the ClusterIP still goes through
kube-proxy's rules. The pods serve the tests' own Greeter (tests/greeter_service.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from conftest import require
from greeter_service import register, say_hello

from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.testing import DNSKind, L7Kind, LocalCluster, missing_components

pytestmark = pytest.mark.cluster

Factory = Callable[..., LocalCluster]
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
CALLS = 90


def start(
    factory: Factory, dns: DNSKind | None, l7: L7Kind | None = None, **kwargs: object
) -> LocalCluster:
    missing = missing_components("iptables", dns, l7)
    require(not missing, "; ".join(missing))
    cluster = factory(
        pods=3, service="iptables", dns=dns, l7=l7, servicer=register, name="greeter", **kwargs
    )
    netns = cluster.network_namespace  # the pods really are inside it, not on the host
    assert netns is not None
    assert all(pod.pid in netns.pids() for pod in cluster.pods)
    return cluster


def calls_until_every_pod_answered(channel: grpc.Channel, pods: int, limit: int = 300) -> None:
    """Warm up (bounded): a round-robin channel sends to the subchannels READY so far."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    for _ in range(limit):
        _, call = say_hello(channel)
        identity = pod_from_metadata(call.initial_metadata())
        assert identity is not None
        seen.add(identity.name)
        if len(seen) == pods or time.monotonic() > deadline:
            break
    assert len(seen) == pods, f"only {sorted(seen)} answered in {limit} calls"


def spread(cluster: LocalCluster, channel: grpc.Channel) -> dict[str, int]:
    cluster.reset_counts()
    for _ in range(CALLS):
        say_hello(channel)
    return cluster.served()


@pytest.mark.parametrize("dns", ["embedded", "dnsmasq"])
def test_the_headless_service_resolves_to_pods_in_the_namespace(
    local_cluster_factory: Factory, dns: DNSKind
) -> None:
    cluster = start(local_cluster_factory, dns=dns)
    options = [("grpc.service_config", ROUND_ROBIN), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(cluster.headless_target, options=options) as channel:
        calls_until_every_pod_answered(channel, 3)
        served = spread(cluster, channel)
    assert served == {pod.name: CALLS // 3 for pod in cluster.pods}, served
    # The ClusterIP still goes through kube-proxy's rules: one connection, one pod.
    with grpc.insecure_channel(cluster.service_target) as channel:
        served = spread(cluster, channel)
    assert sorted(served.values()) == [0, 0, CALLS], served


@pytest.mark.parametrize("l7", ["haproxy", "nginx"])
def test_the_l7_proxy_reaches_pods_in_the_namespace(
    local_cluster_factory: Factory, l7: str
) -> None:
    cluster = start(local_cluster_factory, dns=None, l7=l7, l7_balance="roundrobin")
    with grpc.insecure_channel(cluster.l7_target) as channel:
        served = spread(cluster, channel)
    assert sum(served.values()) == CALLS
    assert max(served.values()) / (CALLS / 3) < 1.3, served


def test_a_killed_pod_leaves_the_dns_and_the_l7_proxy(local_cluster_factory: Factory) -> None:
    cluster = start(local_cluster_factory, dns="embedded", l7="haproxy", l7_balance="roundrobin")
    cluster.kill("greeter-1")
    with grpc.insecure_channel(cluster.l7_target) as channel:
        served = spread(cluster, channel)
    assert set(served) == {"greeter-0", "greeter-2"} and sum(served.values()) == CALLS, served
    answered: Counter[str] = Counter()
    options = [("grpc.service_config", ROUND_ROBIN), ("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(cluster.headless_target, options=options) as channel:
        calls_until_every_pod_answered(channel, 2)
        for _ in range(30):
            _, call = say_hello(channel)
            identity = pod_from_metadata(call.initial_metadata())
            assert identity is not None
            answered[identity.name] += 1
    assert set(answered) == {"greeter-0", "greeter-2"}, answered


def test_forwarders_stopped_as_clients_hang_up_end_quietly(
    local_cluster_factory: Factory, capfd: pytest.CaptureFixture[str]
) -> None:
    """The host reaches the Service and each pod through forwarder processes; stopping the
    cluster just after a balanced channel hung up its connections is a normal end, not a
    traceback per connection on stderr (Python 3.11's asyncio logged each cancelled
    connection handler as an error)."""
    cluster = start(local_cluster_factory, dns=None)
    with balanced_channel(cluster.service_target, observe=False) as channel:
        deadline = time.monotonic() + 20
        while len({lane.pod for lane in channel.pool.lanes if lane.is_available()}) < 3:
            assert time.monotonic() < deadline, channel.pool
            say_hello(channel)
    cluster.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "CancelledError" not in err, err
