"""The two L7 proxies of the local cluster, HAProxy (h2) and nginx (grpc_pass): each balances
one channel's calls per request, follows scale-up, and drops a killed pod without failing calls
that can go elsewhere."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import grpc
import pytest
from calls import CALL_KINDS, call_sync

from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.testing import LocalCluster

Factory = Callable[..., LocalCluster]
pytestmark = pytest.mark.cluster

PROXIES = ("haproxy", "nginx")


def _pods_of(channel: grpc.Channel, kind: str, calls: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(calls):
        result = call_sync(channel, kind)
        assert result.code is grpc.StatusCode.OK
        seen[str(result.initial.get(POD_HEADER))] += 1
    return seen


@pytest.mark.parametrize("proxy", PROXIES)
def test_one_channel_is_balanced_per_request(local_cluster_factory: Factory, proxy: str) -> None:
    cluster = local_cluster_factory(pods=3, dns=None, l7=proxy, l7_balance="roundrobin")
    with grpc.insecure_channel(cluster.l7_target) as channel:
        seen = _pods_of(channel, "unary_unary", 60)
    # One client connection, every pod served: the proxy picks per call, not per connection.
    assert set(seen) == {pod.name for pod in cluster.pods}
    assert cluster.served() == dict(seen)


@pytest.mark.parametrize("kind", CALL_KINDS)
def test_nginx_proxies_every_call_kind(local_cluster_factory: Factory, kind: str) -> None:
    cluster = local_cluster_factory(pods=2, dns=None, l7="nginx", l7_balance="roundrobin")
    with grpc.insecure_channel(cluster.l7_target) as channel:
        seen = _pods_of(channel, kind, 6)
    assert set(seen) == {"charge-points-0", "charge-points-1"}


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_new_pod_gets_calls_and_a_killed_one_costs_none(
    local_cluster_factory: Factory, proxy: str
) -> None:
    cluster = local_cluster_factory(pods=2, dns=None, l7=proxy, l7_balance="roundrobin")
    with grpc.insecure_channel(cluster.l7_target) as channel:
        _pods_of(channel, "unary_unary", 4)
        cluster.scale(3)
        assert "charge-points-2" in _pods_of(channel, "unary_unary", 30)
        cluster.kill("charge-points-0")
        after = _pods_of(channel, "unary_unary", 30)  # every call OK (asserted in _pods_of)
    assert "charge-points-0" not in after
