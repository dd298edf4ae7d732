"""kube-proxy's iptables mode for real: pods, rules and the client in a network namespace.

The pods run inside a namespace of their own with kube-proxy's chains loaded by
``iptables-restore``; the test process reaches the ClusterIP through a host-side bridge that opens
one namespace connection per host connection, so every pick the kernel makes is what a client
inside a cluster would get. The host's own iptables rules are never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from subprocess import Popen

import grpc
import pytest
from conftest import require

from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2 as admin_pb
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2_grpc as admin_grpc
from grpc_balance_mw.testing.kube_proxy import IptablesService, KubeProxy, saved_probability
from grpc_balance_mw.testing.netns import (
    Bridge,
    NetworkNamespace,
    list_namespaces,
    live_namespaces,
    privileged,
    read_line,
)

pytestmark = pytest.mark.cluster

FRESH = [("grpc.use_local_subchannel_pool", 1)]
TIMEOUT_S = 10.0


@dataclass
class NsPod:
    """A demo pod process inside the namespace, and a bridge to its own address."""

    name: str
    ip: str
    port: int
    process: Popen[bytes]
    bridge: Bridge

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def total_calls(self) -> int:
        with grpc.insecure_channel(self.bridge.target) as channel:
            stats = admin_grpc.PodAdminStub(channel).GetStats(
                admin_pb.GetStatsRequest(), timeout=TIMEOUT_S
            )
        return int(stats.total_calls)


def start_pods(netns: NetworkNamespace, names: list[str], first_ip: int) -> list[NsPod]:
    """Start the pods together (each takes about a second to import grpc), then wait for all."""
    started = []
    for offset, name in enumerate(names):
        ip = f"127.0.1.{first_ip + offset}"
        argv = [
            sys.executable,
            "-m",
            "grpc_balance_mw.testing.charge_points.pod",
            "--pod-name",
            name,
        ]
        started.append((name, ip, netns.spawn([*argv, "--bind", f"{ip}:0"])))
    pods = []
    for name, ip, process in started:
        word, _, port = read_line(process, 30.0).partition(" ")
        assert word == "READY", f"{name} said {word!r}"
        pods.append(NsPod(name, ip, int(port), process, netns.bridge(f"{ip}:{port}")))
    return pods


def pod_of_call(channel: grpc.Channel) -> str:
    _, call = pb_grpc.ChargePointsStub(channel).GetChargePoint.with_call(
        pb.GetChargePointRequest(id="cp-1"), timeout=TIMEOUT_S
    )
    identity = pod_from_metadata(call.initial_metadata())
    assert identity is not None
    return identity.name


def fresh_connections(target: str, count: int = 30) -> Counter[str]:
    """One call on each of ``count`` new channels that share no TCP connection."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        with grpc.insecure_channel(target, options=FRESH) as channel:
            seen[pod_of_call(channel)] += 1
    return seen


@pytest.fixture(scope="module")
def netns() -> Iterator[NetworkNamespace]:
    reason = privileged()
    require(reason is None, reason or "")
    with NetworkNamespace() as created:
        yield created


@pytest.fixture(scope="module")
def pods(netns: NetworkNamespace) -> list[NsPod]:
    return start_pods(netns, [f"charge-points-{i}" for i in range(3)], first_ip=1)


@pytest.fixture(scope="module")
def service(netns: NetworkNamespace, pods: list[NsPod]) -> Iterator[IptablesService]:
    svc = IptablesService(netns, "charge-points", "ev", "10.96.0.10", 80)
    svc.start([pod.endpoint for pod in pods])
    yield svc
    svc.stop()


def test_one_channel_puts_every_call_on_one_pod(
    service: IptablesService, pods: list[NsPod]
) -> None:
    before = {pod.name: pod.total_calls() for pod in pods}
    with grpc.insecure_channel(service.target, options=FRESH) as channel:
        seen = Counter(pod_of_call(channel) for _ in range(100))
    assert len(seen) == 1 and sum(seen.values()) == 100
    (served_by,) = seen
    # The pods' own counts agree with what the headers said.
    served = {pod.name: pod.total_calls() - before[pod.name] for pod in pods}
    assert served == {name: 100 if name == served_by else 0 for name in served}


def test_fresh_connections_spread_over_every_pod(
    service: IptablesService, pods: list[NsPod]
) -> None:
    seen = fresh_connections(service.target)
    # Missing a pod in 30 fair picks among 3 happens about once in 60,000 runs.
    assert set(seen) == {pod.name for pod in pods}


def test_client_ip_affinity_keeps_fresh_connections_on_one_pod(
    netns: NetworkNamespace, pods: list[NsPod]
) -> None:
    sticky = IptablesService(netns, "charge-points-sticky", "ev", "10.96.0.11", 80,
                             session_affinity="ClientIP")  # fmt: skip
    sticky.start([pod.endpoint for pod in pods])
    try:
        seen = fresh_connections(sticky.target)
        assert len(seen) == 1, seen
        assert "--rcheck --seconds 10800 --reap" in sticky.rules()
    finally:
        sticky.stop()


def test_rules_in_the_namespace_have_kube_proxys_shape(
    service: IptablesService, pods: list[NsPod]
) -> None:
    saved = service.rules()
    svc_chain = service.spec.svc_chain
    assert (
        "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment"
        f' --comment "ev/charge-points cluster IP" -m tcp --dport 80 -j {svc_chain}'
    ) in saved
    rules = [line for line in saved.splitlines() if line.startswith(f"-A {svc_chain} ")]
    assert len(rules) == 3
    assert f"--probability {saved_probability(3)} " in rules[0]
    assert f"--probability {saved_probability(2)} " in rules[1]
    assert "statistic" not in rules[2]
    for pod in pods:
        sep = service.spec.sep_chain(pod.endpoint)
        assert f":{sep} - [0:0]" in saved
        assert f"-j DNAT --to-destination {pod.ip}:{pod.port}" in saved
    assert "-A OUTPUT -m comment --comment" in saved


def test_a_killed_pod_drops_out_of_the_service(netns: NetworkNamespace) -> None:
    pods = start_pods(netns, ["doomed-0", "doomed-1", "doomed-2"], first_ip=11)
    svc = IptablesService(netns, "doomed", "ev", "10.96.0.12", 80)
    try:
        svc.start([pod.endpoint for pod in pods])
        assert set(fresh_connections(svc.target)) == {pod.name for pod in pods}
        victim, *survivors = pods
        netns.stop_process(victim.process, grace_s=0)  # SIGKILL
        assert victim.process.returncode == -signal.SIGKILL
        svc.update([pod.endpoint for pod in survivors])
        seen = fresh_connections(svc.target)
        assert set(seen) == {pod.name for pod in survivors}
        svc.update([])
        channel = grpc.insecure_channel(svc.target, options=FRESH)
        with channel, pytest.raises(grpc.RpcError) as refused:
            pod_of_call(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        svc.stop()
        for pod in pods:
            pod.bridge.close()
            netns.stop_process(pod.process)


def test_two_services_in_one_namespace_share_one_kube_proxy(
    netns: NetworkNamespace, service: IptablesService
) -> None:
    other = IptablesService(netns, "billing", "ev", "10.96.0.13", 80)
    other.start([("127.0.1.1", 1)])
    try:
        assert other.proxy is service.proxy is KubeProxy.of(netns)
        saved = service.rules()
        assert service.spec.svc_chain in saved and other.spec.svc_chain in saved
    finally:
        other.stop()
    assert other.spec.svc_chain not in service.rules()
    assert service.spec.svc_chain in service.rules()


def test_stop_removes_the_namespace_and_every_process() -> None:
    reason = privileged()
    require(reason is None, reason or "")
    svc = IptablesService()  # makes and owns its namespace
    name = svc.netns.name
    (pod,) = start_pods(svc.netns, ["lonely-0"], first_ip=1)
    svc.start([pod.endpoint])
    with grpc.insecure_channel(svc.target, options=FRESH) as channel:
        assert pod_of_call(channel) == "lonely-0"
    pids = [process.pid for process in svc.netns.processes()]
    assert len(pids) == 3  # the pod, its bridge, the service's bridge
    assert name in list_namespaces()
    svc.stop()
    svc.stop()  # idempotent
    assert name not in list_namespaces()
    assert name not in live_namespaces()
    assert svc.netns.processes() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_privilege_check_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    check = privileged.__wrapped__  # uncached: this test changes what it sees
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert check() == "network namespaces and iptables need root"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda tool: None if tool == "iptables-restore" else real_which(tool)
    )
    assert check() == "iptables-restore is not installed"


def test_a_bridge_refuses_when_nothing_listens_and_exits_with_its_parent(
    netns: NetworkNamespace,
) -> None:
    bridge = netns.bridge("127.0.9.9:9")  # nothing listens there inside the namespace
    # On loopback the reset can overtake connect() itself, or come at the first read.
    with (
        pytest.raises(ConnectionResetError),
        socket.create_connection(("127.0.0.1", bridge.port), timeout=TIMEOUT_S) as conn,
    ):
        conn.settimeout(TIMEOUT_S)
        conn.recv(1)
    (process,) = [p for p in netns.processes() if p.pid == bridge.pid]
    assert process.stdin is not None
    process.stdin.close()  # what the kernel does when the test process dies
    assert process.wait(timeout=TIMEOUT_S) == 0
    bridge.close()
