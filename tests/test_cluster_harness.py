"""The local cluster harness itself: pod control, readiness, capacity, DNS wire format, cleanup."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from grpc_balance_mw.dns_message import (
    NOERROR,
    NXDOMAIN,
    answer,
    lookup_a,
    parse_answer,
    query,
)
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.testing import ClusterError, LocalCluster, missing_components
from grpc_balance_mw.testing import cluster as cluster_module
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.testing.pytest_plugin import require_components

Factory = Callable[..., LocalCluster]
FRESH = [("grpc.use_local_subchannel_pool", 1)]
FQDN = "charge-points.ev.svc.cluster.local"
TYPE_AAAA = 28
USED_ADDRESSES: list[str] = []  # every address a cluster here listened on, for the leak check


def get(target: str, timeout: float = 10) -> grpc.Call:
    with grpc.insecure_channel(target, options=FRESH) as channel:
        stub = pb_grpc.ChargePointsStub(channel)
        _, call = stub.GetChargePoint.with_call(pb.GetChargePointRequest(id="x"), timeout=timeout)
        return call


def remember(cluster: LocalCluster) -> LocalCluster:
    USED_ADDRESSES.extend(pod.address for pod in cluster.pods)
    USED_ADDRESSES.append(cluster.service_target)
    if cluster.dns_kind:
        USED_ADDRESSES.append(cluster.dns_address)
    return cluster


# -- the DNS wire format, no sockets --------------------------------------------------------


def test_a_known_name_gets_one_a_record_per_address() -> None:
    reply = answer(query(7, FQDN.upper()), {FQDN: ["127.0.1.1", "127.0.1.2"]}, ttl_s=5)
    assert parse_answer(reply) == (NOERROR, ["127.0.1.1", "127.0.1.2"])
    assert reply[:2] == b"\x00\x07"
    ttl = struct.unpack_from("!I", reply, len(query(7, FQDN)) + 6)[0]
    assert ttl == 5


def test_aaaa_for_a_known_name_is_noerror_without_data() -> None:
    reply = answer(query(8, FQDN, TYPE_AAAA), {FQDN: ["127.0.1.1"]}, ttl_s=1)
    assert parse_answer(reply) == (NOERROR, [])


def test_an_unknown_name_is_nxdomain() -> None:
    reply = answer(query(9, "other.ev.svc.cluster.local"), {FQDN: ["127.0.1.1"]}, ttl_s=1)
    assert parse_answer(reply) == (NXDOMAIN, [])


def test_a_malformed_query_is_formerr() -> None:
    reply = answer(b"\x00\x0a\x01", {}, ttl_s=1)
    assert reply[:2] == b"\x00\x0a"
    assert reply[3] & 0x0F == 1


@pytest.mark.slow
def test_the_embedded_dns_answers_over_tcp(local_cluster_factory: Factory) -> None:
    cluster = remember(local_cluster_factory(pods=2))
    host, port = cluster.dns_address.rsplit(":", 1)
    message = query(11, cluster.fqdn)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(message)) + message)
        (length,) = struct.unpack("!H", sock.recv(2))
        reply = b""
        while len(reply) < length:
            reply += sock.recv(length - len(reply))
    assert parse_answer(reply) == (NOERROR, sorted(pod.ip for pod in cluster.pods))


# -- pods and readiness ---------------------------------------------------------------------


@pytest.mark.local_cluster(pods=2, service="userspace")
@pytest.mark.slow
def test_the_marker_configures_the_fixture(local_cluster: LocalCluster) -> None:
    remember(local_cluster)
    assert [pod.name for pod in local_cluster.pods] == ["charge-points-0", "charge-points-1"]
    assert local_cluster.running


@pytest.mark.slow
def test_pods_share_a_target_port_on_their_own_ips_and_the_service_port_differs(
    local_cluster_factory: Factory,
) -> None:
    cluster = remember(local_cluster_factory(pods=3))
    assert len({pod.ip for pod in cluster.pods}) == 3
    assert {pod.port for pod in cluster.pods} == {cluster.target_port}
    assert int(cluster.service_target.rsplit(":", 1)[1]) != cluster.target_port
    assert cluster.headless_target == (
        f"dns://{cluster.dns_address}/charge-points.ev.svc.cluster.local:{cluster.target_port}"
    )


@pytest.mark.slow
def test_each_pod_stamps_its_own_identity(local_cluster_factory: Factory) -> None:
    cluster = remember(local_cluster_factory(pods=2, namespace="fleet", name="meters"))
    for pod in cluster.pods:
        identity = pod_from_metadata(get(pod.address).initial_metadata())
        assert identity is not None
        assert (identity.name, identity.ip, identity.namespace) == (pod.name, pod.ip, "fleet")
    assert cluster.served() == {"meters-0": 1, "meters-1": 1}
    cluster.reset_counts()
    assert cluster.served() == {"meters-0": 0, "meters-1": 0}


@pytest.mark.cluster
def test_a_not_serving_pod_leaves_the_endpoints_and_comes_back(
    local_cluster_factory: Factory,
) -> None:
    cluster = remember(local_cluster_factory(pods=3, service="haproxy"))
    cluster.set_serving("charge-points-0", False)

    assert [e.name for e in cluster.endpoints()] == ["charge-points-1", "charge-points-2"]
    assert cluster.pods[0].ip not in (lookup_a(cluster.dns_address, cluster.fqdn) or [])
    for _ in range(20):
        get(cluster.service_target)
    assert cluster.served()["charge-points-0"] == 0  # alive, but no new connections

    cluster.set_serving("charge-points-0", True)
    assert cluster.pods[0].ip in (lookup_a(cluster.dns_address, cluster.fqdn) or [])


@pytest.mark.cluster
def test_a_killed_pod_restarts_on_its_address(local_cluster_factory: Factory) -> None:
    cluster = remember(local_cluster_factory(pods=2, service="haproxy", dns="dnsmasq"))
    pod = cluster.pod("charge-points-1")
    old_pid = pod.pid
    cluster.kill(pod.name)
    assert not pod.alive
    assert lookup_a(cluster.dns_address, cluster.fqdn) == [cluster.pods[0].ip]

    cluster.restart(pod.name)

    assert pod.alive and pod.pid != old_pid
    assert lookup_a(cluster.dns_address, cluster.fqdn) == sorted(p.ip for p in cluster.pods)
    assert pod_from_metadata(get(pod.address).initial_metadata()).name == pod.name  # type: ignore[union-attr]


@pytest.mark.slow
def test_scaling_down_removes_the_newest_pods(local_cluster_factory: Factory) -> None:
    cluster = remember(local_cluster_factory(pods=3))
    removed = cluster.pods[1:]
    cluster.scale(1)
    assert [pod.name for pod in cluster.pods] == ["charge-points-0"]
    assert not any(pod.alive for pod in removed)
    assert lookup_a(cluster.dns_address, cluster.fqdn) == [cluster.pods[0].ip]
    cluster.scale(2)
    assert cluster.pods[1].name == "charge-points-3"  # a new pod, a new name and IP


@pytest.mark.slow
def test_a_pod_beyond_capacity_rejects_when_so_configured(local_cluster_factory: Factory) -> None:
    cluster = remember(local_cluster_factory(pods=1, dns=None, overflow="reject"))
    pod = cluster.pods[0]
    cluster.configure(pod.name, service_time_ms=300, max_concurrent=1)

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: _code(pod.address), range(4)))

    assert outcomes.count(grpc.StatusCode.OK) >= 1
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
    stats = cluster.stats()[pod.name]
    assert stats.rejected == outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert stats.max_in_flight == 1


@pytest.mark.slow
def test_a_pod_beyond_capacity_queues_by_default(local_cluster_factory: Factory) -> None:
    cluster = remember(
        local_cluster_factory(pods=1, dns=None, service_time_ms=100, max_concurrent=2)
    )
    pod = cluster.pods[0]
    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(lambda _: _code(pod.address), range(5)))
    assert outcomes == [grpc.StatusCode.OK] * 5
    assert cluster.stats()[pod.name].max_in_flight == 2


def _code(target: str) -> grpc.StatusCode:
    try:
        get(target)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


# -- configuration and lifecycle --------------------------------------------------------------


def test_session_affinity_needs_the_iptables_backend() -> None:
    with pytest.raises(ConfigurationError, match="iptables"):
        LocalCluster(service="userspace", session_affinity="ClientIP")


@pytest.mark.cluster
def test_iptables_pods_are_driven_inside_their_namespace(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(pods=2, service="iptables")
    USED_ADDRESSES.append(cluster.service_target)
    cluster.set_serving("charge-points-0", False)
    for _ in range(10):
        get(cluster.service_target)
    assert cluster.served() == {"charge-points-0": 0, "charge-points-1": 10}

    cluster.kill("charge-points-1")
    cluster.set_serving("charge-points-0", True)
    cluster.restart("charge-points-1")
    cluster.reset_counts()
    for _ in range(20):
        get(cluster.service_target)
    assert sum(cluster.served().values()) == 20


def test_unknown_implementations_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="service"):
        LocalCluster(service="ipvs")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="dns"):
        LocalCluster(dns="coredns")  # type: ignore[arg-type]


def test_a_missing_component_skips_locally_and_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cluster_module, "haproxy_path", lambda: None)
    assert missing_components(service="haproxy") == [
        "haproxy is not installed (Debian package: haproxy)"
    ]
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="haproxy is not installed"):
        require_components(service="userspace", l7="haproxy")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing in CI"):
        require_components(service="haproxy")
    require_components(service="userspace", dns="embedded")  # nothing to install


def test_targets_of_a_stopped_cluster_say_so() -> None:
    cluster = LocalCluster(dns=None)
    with pytest.raises(ClusterError, match="not running"):
        _ = cluster.service_target
    cluster.stop()  # idempotent, also before start


@pytest.mark.cluster
def test_stop_leaves_no_process_port_or_file() -> None:
    cluster = LocalCluster(pods=2, service="haproxy", dns="dnsmasq", l7="haproxy")
    with cluster:
        addresses = [cluster.service_target, cluster.l7_target, cluster.dns_address]
        addresses += [pod.address for pod in cluster.pods]
        pids = [pod.pid for pod in cluster.pods]
        workdir = cluster.workdir
        assert repr(cluster).startswith("<LocalCluster charge-points.ev running: 2 pods")
    cluster.stop()
    assert not cluster.running
    assert workdir is not None and not workdir.exists()
    for pid in pids:
        assert pid is not None and not Path(f"/proc/{pid}").exists()
    for address in addresses:
        assert not _accepts(address), address


@pytest.mark.slow
def test_no_cluster_here_left_a_port_open() -> None:
    """Runs last in this module; every cluster above was torn down by its fixture."""
    leaked = [address for address in USED_ADDRESSES if _accepts(address)]
    assert USED_ADDRESSES
    assert leaked == []


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
