"""A server that is not Python: the grpc-js pod of examples/node follows the identity contract
(docs/identity.md), and the Python client works with it as it works with Python pods.

Three Node.js pods run behind the local userspace Service. Every claim about where a call went
is the pod header of its own response. Needs node and ``scripts/setup_node.sh`` (npm ci):
skipped without them locally, a failure under CI=true.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import ABORT, CALL_KINDS, OK, RAISE, call_sync
from conftest import require
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw import POD_HEADER, POD_IP_HEADER, POD_NAMESPACE_HEADER, PodIdentity
from grpc_balance_mw import observe as observe_sync
from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.aio import balanced_channel as aio_balanced_channel
from grpc_balance_mw.aio import observe as observe_aio
from grpc_balance_mw.channel import balanced_channel
from grpc_balance_mw.health_check import NOT_SERVING, SERVING, check_method
from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import ATTR_POD, AffinityTelemetry
from grpc_balance_mw.testing import ClusterError, Endpoint, LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.testing.process import ChildProcess
from grpc_balance_mw.testing.userspace_proxy import UserspaceService

pytestmark = pytest.mark.cluster

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"
MODES = ("sync", "aio")
NAMESPACE = "ev"
#: Calls counted for the spread; the pods' fair share is a third.
SPREAD_CALLS = 300


def _require_node() -> str:
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
    require(
        node is not None and installed,
        "node and examples/node/node_modules are needed (run scripts/setup_node.sh)",
    )
    assert node is not None
    return node


class NodePod:
    """One ``examples/node/server.js`` process on 127.0.0.1, port 0."""

    def __init__(self, log_dir: Path, name: str, ip: str = "127.0.0.1", **env: str) -> None:
        self.name = name
        self.ip = ip
        self.env = {"POD_NAME": name, "POD_IP": ip, "POD_NAMESPACE": NAMESPACE, **env}
        # `env -i`: the pod sees only its own identity, not whatever this shell has set.
        environment = [f"{key}={value}" for key, value in self.env.items()]
        server = [str(NODE_DIR / "server.js"), "--host", "127.0.0.1", "--port", "0"]
        self.process = ChildProcess(
            ["env", "-i", *environment, _require_node(), *server],
            name=f"node-{name}",
            log_dir=log_dir,
        )
        self.port = 0

    def start(self) -> NodePod:
        self.process.start()
        return self

    def wait_ready(self) -> NodePod:
        # Node loads the protos with protobufjs at start-up: seconds on a busy machine.
        self.port = self.process.wait_ready(timeout=60)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop(grace_s=0.0)  # SIGKILL by pid and reap: no drain wanted here


class NodeCluster:
    """Three Node pods behind the embedded userspace Service (per-connection, like kube-proxy)."""

    def __init__(self, log_dir: Path) -> None:
        self.pods = [NodePod(log_dir, f"charge-points-node-{i}") for i in range(3)]
        self.service = UserspaceService(log_dir)

    def start(self) -> NodeCluster:
        for pod in self.pods:
            pod.start()
        for pod in self.pods:
            pod.wait_ready()
        self.service.start([Endpoint(p.name, "127.0.0.1", p.port) for p in self.pods])
        return self

    @property
    def names(self) -> set[str]:
        return {pod.name for pod in self.pods}

    def stop(self) -> None:
        self.service.stop()
        for pod in self.pods:
            pod.stop()


@pytest.fixture(scope="module")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    _require_node()
    cluster = NodeCluster(tmp_path_factory.mktemp("node-pods"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def tracer_provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _identity_of(pod: NodePod) -> PodIdentity:
    return PodIdentity(name=pod.name, ip=pod.ip, namespace=NAMESPACE)


@pytest.mark.parametrize("fail", [OK, ABORT, RAISE], ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", CALL_KINDS)
def test_node_pod_stamps_headers_and_trailers_on_every_call(
    node_cluster: NodeCluster, kind: str, fail: int
) -> None:
    pod = node_cluster.pods[0]
    with grpc.insecure_channel(pod.target) as channel:
        seen = call_sync(channel, kind, fail)
    expected = {OK: grpc.StatusCode.OK, ABORT: grpc.StatusCode.FAILED_PRECONDITION}
    assert seen.code == expected.get(fail, grpc.StatusCode.UNKNOWN)
    for metadata in (seen.initial, seen.trailing):
        assert metadata[POD_HEADER] == pod.name
        assert pod_from_metadata(metadata.items()) == _identity_of(pod)


def test_node_health_check_names_the_pod(node_cluster: NodeCluster) -> None:
    """The balanced channel's lanes learn their pod from Health/Check on a fresh connection."""
    pod = node_cluster.pods[1]
    with grpc.insecure_channel(pod.target) as channel:
        check = check_method(channel)
        for service in ("", SERVICE_NAME):
            status, call = check.with_call(service, timeout=10)
            assert status == SERVING
            for metadata in (call.initial_metadata(), call.trailing_metadata()):
                assert pod_from_metadata(metadata) == _identity_of(pod)
        with pytest.raises(grpc.RpcError) as failed:
            check("no.such.Service", timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert pod_from_metadata(failed.value.trailing_metadata()) == _identity_of(pod)


@pytest.mark.parametrize("mode", MODES)
def test_observe_names_the_node_pod_a_plain_channel_reached(
    node_cluster: NodeCluster,
    tracer_provider: tuple[TracerProvider, InMemorySpanExporter],
    mode: str,
) -> None:
    provider, exporter = tracer_provider
    options = ObserveOptions(
        registry=AffinityRegistry(AffinityConfig(warmup_s=0)),
        telemetry=AffinityTelemetry(tracer_provider=provider, metrics=False),
    )
    target = node_cluster.service.address
    request = pb.GetChargePointRequest(id="cp-1")

    async def calls_aio() -> Any:
        async with observe_aio(grpc.aio.insecure_channel(target), options) as channel:
            stub = pb_grpc.ChargePointsStub(channel)
            for _ in range(20):
                await stub.GetChargePoint(request, timeout=10)
            return channel.detector.snapshot()

    if mode == "sync":
        with observe_sync(grpc.insecure_channel(target), options) as channel:
            stub = pb_grpc.ChargePointsStub(channel)
            for _ in range(20):
                stub.GetChargePoint(request, timeout=10)
            snapshot = channel.detector.snapshot()
    else:
        snapshot = asyncio.run(calls_aio())
    # One channel through a per-connection Service: one Node pod, named in each call's span.
    assert set(snapshot.pods) <= node_cluster.names and len(snapshot.pods) == 1, snapshot
    assert snapshot.unknown_calls == 0 and snapshot.calls == 20, snapshot
    pods = [dict(span.attributes or {}).get(ATTR_POD) for span in exporter.get_finished_spans()]
    assert pods == [snapshot.top_pod] * 20


def _spread_sync(target: str) -> Counter[str]:
    channel = balanced_channel(target, observe=ObserveOptions(expected_pods=3))
    try:
        _wait_for_lanes(channel)
        stub = pb_grpc.ChargePointsStub(channel)
        counts: Counter[str] = Counter()
        for _ in range(SPREAD_CALLS):
            _, call = stub.GetChargePoint.with_call(pb.GetChargePointRequest(id="cp"), timeout=10)
            counts[dict(call.initial_metadata())[POD_HEADER]] += 1
        return counts
    finally:
        channel.close()


async def _spread_aio(target: str) -> Counter[str]:
    channel = aio_balanced_channel(target, observe=ObserveOptions(expected_pods=3))
    try:
        await asyncio.to_thread(_wait_for_lanes, channel)
        stub = pb_grpc.ChargePointsStub(channel)
        counts: Counter[str] = Counter()
        for _ in range(SPREAD_CALLS):
            call = stub.GetChargePoint(pb.GetChargePointRequest(id="cp"), timeout=10)
            await call
            counts[dict(tuple(await call.initial_metadata()))[POD_HEADER]] += 1
        return counts
    finally:
        await channel.close()


def _wait_for_lanes(channel: Any, timeout_s: float = 20.0) -> None:
    """Until the lanes cover all three pods (each learnt from a Health/Check's headers)."""
    deadline = time.monotonic() + timeout_s
    while len({lane.pod for lane in channel.pool.lanes if lane.is_available() and lane.pod}) < 3:
        assert time.monotonic() < deadline, f"lanes never covered 3 pods: {channel!r}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def python_cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        yield running


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("language", ["node", "python"])
def test_balanced_channel_spreads_over_node_pods_as_over_python_pods(
    request: pytest.FixtureRequest, language: str, mode: str
) -> None:
    if language == "node":
        node: NodeCluster = request.getfixturevalue("node_cluster")
        target, names = node.service.address, node.names
    else:
        python: LocalCluster = request.getfixturevalue("python_cluster")
        target, names = python.service_target, {e.name for e in python.endpoints()}
    counts = _spread_sync(target) if mode == "sync" else asyncio.run(_spread_aio(target))
    assert set(counts) == names, counts
    assert sum(counts.values()) == SPREAD_CALLS
    fair = SPREAD_CALLS / 3
    assert max(counts.values()) / fair < 1.3, counts


def test_sigterm_drains_not_serving_first_then_stops(tmp_path: Path) -> None:
    pod = NodePod(tmp_path, "charge-points-node-drain", DRAIN_SECONDS="5")
    try:
        pod.start().wait_ready()
        with grpc.insecure_channel(pod.target) as channel:
            check = check_method(channel)
            assert check("", timeout=10) == SERVING  # connected before the signal
            pod.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while check("", timeout=10) != NOT_SERVING:
                assert time.monotonic() < deadline, "health never turned NOT_SERVING"
                time.sleep(0.05)
            # Still serving calls while draining, still naming itself.
            seen = call_sync(channel, "unary_unary")
            assert seen.code == grpc.StatusCode.OK and seen.initial[POD_HEADER] == pod.name
        # Then it stops by itself (tryShutdown after the drain), well before any SIGKILL.
        deadline = time.monotonic() + 30
        while pod.process.alive:
            assert time.monotonic() < deadline, f"still running 30 s after SIGTERM: {pod.process}"
            time.sleep(0.1)
        assert "stopped" in pod.process.log_tail()
    finally:
        pod.stop()


def test_opaque_mode_matches_the_python_opaque_id(tmp_path: Path) -> None:
    key = "0123456789abcdef0123"
    pod = NodePod(tmp_path, "charge-points-node-opaque", GRPC_BALANCE_POD_KEY=key)
    try:
        pod.start().wait_ready()
        with grpc.insecure_channel(pod.target) as channel:
            seen = call_sync(channel, "unary_unary")
    finally:
        pod.stop()
    expected = _identity_of(pod).to_opaque(key)
    for metadata in (seen.initial, seen.trailing):
        assert metadata[POD_HEADER] == expected.name
        assert POD_IP_HEADER not in metadata and POD_NAMESPACE_HEADER not in metadata
        assert pod_from_metadata(metadata.items()) == expected


@pytest.mark.parametrize(
    "env",
    [{"POD_NAME": "trailing-space "}, {"POD_IP": "not-an-ip"}, {"GRPC_BALANCE_POD_KEY": "short"}],
    ids=["blank-end", "bad-ip", "short-key"],
)
def test_an_identity_the_client_would_reject_stops_the_pod_at_start(
    tmp_path: Path, env: dict[str, str]
) -> None:
    pod = NodePod(tmp_path, "charge-points-node-bad", **env)
    try:
        pod.start()
        with pytest.raises(ClusterError, match="exited with 2"):
            pod.wait_ready()
    finally:
        pod.stop()
