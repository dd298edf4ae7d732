"""Servers that are not Python follow the identity contract (docs/identity.md), and the Python
client works with them as it works with Python pods.

The grpc-js pod of examples/node is the one CI requires: it needs node and
``scripts/setup_node.sh`` (npm ci), and is skipped without them locally, a failure under
CI=true. The grpc-go recipe of examples/go runs too where Go and Debian's grpc-go packages are
installed (``scripts/setup_go.sh``), skipped where they are not, a failure under CI=true. Three
pods of each run behind the local userspace Service; every claim about where a call went is the
pod header of its response.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import ABORT, CALL_KINDS, OK, RAISE, call_sync
from conftest import require
from foreign_pods import SPREADS, Command, ForeignPod, PodsBehindService, assert_spread_evenly
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw import POD_HEADER, POD_IP_HEADER, POD_NAMESPACE_HEADER
from grpc_balance_mw import observe as observe_sync
from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.aio import observe as observe_aio
from grpc_balance_mw.health_check import (
    NOT_SERVING,
    SERVING,
    check_method,
    decode_status,
    encode_request,
)
from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import ATTR_POD, AffinityTelemetry
from grpc_balance_mw.testing import ClusterError, LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.leaks_per_module(
        reason="module-scoped pods per language (node, go, python) behind one Service each"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "examples" / "node"
GO_DIR = ROOT / "examples" / "go"
#: Debian's Go packages (golang-go, golang-google-grpc-dev): a GOPATH build, no module proxy.
DEBIAN_GOCODE = Path("/usr/share/gocode")
MODES = ("sync", "aio")
LANGUAGES = ("node", "go")
WATCH_METHOD = "/grpc.health.v1.Health/Watch"
#: The fixtures hand out a function of the language: pods start only for the tests that run.
Commands = Callable[[str], Command]
Clusters = Callable[[str], PodsBehindService]


def _node_command() -> list[str]:
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir()
    require(
        node is not None and installed,
        "node and examples/node/node_modules are needed (run scripts/setup_node.sh)",
    )
    assert node is not None
    return [node, str(NODE_DIR / "server.js"), "--host", "127.0.0.1", "--port", "0"]


def _go_command(build_dir: Path) -> list[str]:
    """examples/go's healthpod, built against Debian's grpc-go."""
    go = shutil.which("go")
    require(
        go is not None and (DEBIAN_GOCODE / "src/google.golang.org/grpc/health").is_dir(),
        "go and Debian's golang-google-grpc-dev are needed for the Go recipe (scripts/setup_go.sh)",
    )
    assert go is not None
    gopath = build_dir / "gopath"
    (gopath / "src/example.com").mkdir(parents=True)
    (gopath / "src/example.com/grpcbalance").symlink_to(GO_DIR)
    binary = build_dir / "healthpod"
    built = subprocess.run(
        [go, "build", "-o", str(binary), "example.com/grpcbalance/cmd/healthpod"],
        env={**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:{DEBIAN_GOCODE}"}
        | _go_cache(build_dir),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return [str(binary), "-listen", "127.0.0.1:0"]


def _go_cache(build_dir: Path) -> dict[str, str]:
    """Go's own build cache (~/.cache/go-build) when it has one: a cold build of grpc-go takes a
    minute. Without HOME (some CI environments) Go has none and refuses to build."""
    if any(os.environ.get(name) for name in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        return {}
    return {"GOCACHE": str(build_dir / "cache")}


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Commands]:
    """Each language's pod argv, made on first use (the Go binary is built once)."""
    made: dict[str, Command] = {}

    def command(language: str) -> Command:
        if language not in made:
            build = tmp_path_factory.mktemp("go-build") if language == "go" else None
            made[language] = _node_command() if build is None else _go_command(build)
        return made[language]

    yield command


@pytest.fixture(scope="module")
def clusters(commands: Commands, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    """Three pods of a language behind the Service, started on first use, stopped at the end."""
    started: dict[str, PodsBehindService] = {}

    def of(language: str) -> PodsBehindService:
        if language not in started:
            log_dir = tmp_path_factory.mktemp(f"{language}-pods")
            cluster = PodsBehindService(commands(language), log_dir, f"cp-{language}")
            started[language] = cluster
            cluster.start()
        return started[language]

    try:
        yield of
    finally:
        for cluster in started.values():
            cluster.stop()


@pytest.fixture
def tracer_provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


#: The Go recipe's stand-in service only answers OK; its error path is tested on health.
STAMPED = [
    pytest.param(language, kind, fail, id=f"{language}-{kind}-{name}")
    for language in LANGUAGES
    for kind in CALL_KINDS
    for fail, name in ((OK, "ok"), (ABORT, "abort"), (RAISE, "raise"))
    if language == "node" or fail == OK
]


@pytest.mark.parametrize(("language", "kind", "fail"), STAMPED)
def test_pod_stamps_headers_and_trailers_on_every_call(
    clusters: Clusters, language: str, kind: str, fail: int
) -> None:
    pod = clusters(language).pods[0]
    with grpc.insecure_channel(pod.target) as channel:
        seen = call_sync(channel, kind, fail)
    expected = {OK: grpc.StatusCode.OK, ABORT: grpc.StatusCode.FAILED_PRECONDITION}
    assert seen.code == expected.get(fail, grpc.StatusCode.UNKNOWN)
    for metadata in (seen.initial, seen.trailing):
        assert metadata[POD_HEADER] == pod.name
        assert pod_from_metadata(metadata.items()) == pod.identity


@pytest.mark.parametrize("language", LANGUAGES)
def test_health_check_names_the_pod(clusters: Clusters, language: str) -> None:
    """The balanced channel's lanes learn their pod from Health/Check on a fresh connection."""
    pod = clusters(language).pods[1]
    services = ("", SERVICE_NAME) if language == "node" else ("",)
    with grpc.insecure_channel(pod.target) as channel:
        check = check_method(channel)
        for service in services:
            status, call = check.with_call(service, timeout=10)
            assert status == SERVING
            for metadata in (call.initial_metadata(), call.trailing_metadata()):
                assert pod_from_metadata(metadata) == pod.identity
        with pytest.raises(grpc.RpcError) as failed:
            check("no.such.Service", timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    for metadata in (failed.value.initial_metadata(), failed.value.trailing_metadata()):
        assert pod_from_metadata(metadata) == pod.identity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("language", LANGUAGES)
def test_observe_names_the_pod_a_plain_channel_reached(
    clusters: Clusters,
    tracer_provider: tuple[TracerProvider, InMemorySpanExporter],
    language: str,
    mode: str,
) -> None:
    cluster = clusters(language)
    provider, exporter = tracer_provider
    options = ObserveOptions(
        registry=AffinityRegistry(AffinityConfig(warmup_s=0)),
        telemetry=AffinityTelemetry(tracer_provider=provider, metrics=False),
    )
    target = cluster.service.address
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
    # One channel through a per-connection Service: one pod, named in each call's span.
    assert set(snapshot.pods) <= cluster.names and len(snapshot.pods) == 1, snapshot
    assert snapshot.unknown_calls == 0 and snapshot.calls == 20, snapshot
    pods = [dict(span.attributes or {}).get(ATTR_POD) for span in exporter.get_finished_spans()]
    assert pods == [snapshot.top_pod] * 20


@pytest.fixture(scope="module")
def python_cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        yield running


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("language", [*LANGUAGES, "python"])
def test_balanced_channel_spreads_over_the_pods_as_over_python_pods(
    request: pytest.FixtureRequest, clusters: Clusters, language: str, mode: str
) -> None:
    if language == "python":
        python: LocalCluster = request.getfixturevalue("python_cluster")
        target, names = python.service_target, {e.name for e in python.endpoints()}
    else:
        cluster = clusters(language)
        target, names = cluster.service.address, cluster.names
    assert_spread_evenly(SPREADS[mode](target), names)


@pytest.mark.parametrize("language", LANGUAGES)
def test_sigterm_drains_not_serving_first_then_stops(
    commands: Commands, tmp_path: Path, language: str
) -> None:
    # The drain outlasts the waits for NOT_SERVING: the call after them falls inside it.
    pod = ForeignPod(commands(language), tmp_path, "cp-drain", DRAIN_SECONDS="8")
    try:
        pod.start().wait_ready()
        with grpc.insecure_channel(pod.target) as channel:
            check = check_method(channel)
            watch = channel.unary_stream(
                WATCH_METHOD, request_serializer=encode_request, response_deserializer=decode_status
            )("", timeout=20)
            assert next(watch) == SERVING  # connected and watching before the signal
            pod.process.send_signal(signal.SIGTERM)
            assert next(watch) == NOT_SERVING  # pushed to the watchers (bounded by its deadline)
            watch.cancel()
            assert check("", timeout=5) == NOT_SERVING
            # Still serving calls while draining, still naming itself.
            seen = call_sync(channel, "unary_unary")
            assert seen.code == grpc.StatusCode.OK and seen.initial[POD_HEADER] == pod.name
        # Then it stops by itself after the drain, well before any SIGKILL.
        deadline = time.monotonic() + 30
        while pod.process.alive:
            assert time.monotonic() < deadline, f"still running 30 s after SIGTERM: {pod.process}"
            time.sleep(0.1)
        assert "stopped" in pod.process.log_tail()
    finally:
        pod.stop()


@pytest.mark.parametrize("language", LANGUAGES)
def test_opaque_mode_matches_the_python_opaque_id(
    commands: Commands, tmp_path: Path, language: str
) -> None:
    key = "0123456789abcdef0123"
    pod = ForeignPod(commands(language), tmp_path, "cp-opaque", GRPC_BALANCE_POD_KEY=key)
    try:
        pod.start().wait_ready()
        with grpc.insecure_channel(pod.target) as channel:
            seen = call_sync(channel, "unary_unary")
    finally:
        pod.stop()
    expected = pod.identity.to_opaque(key)
    for metadata in (seen.initial, seen.trailing):
        assert metadata[POD_HEADER] == expected.name
        assert POD_IP_HEADER not in metadata and POD_NAMESPACE_HEADER not in metadata
        assert pod_from_metadata(metadata.items()) == expected


@pytest.mark.parametrize(
    "env",
    [{"POD_NAME": "trailing-space "}, {"POD_IP": "not-an-ip"}, {"GRPC_BALANCE_POD_KEY": "short"}],
    ids=["blank-end", "bad-ip", "short-key"],
)
@pytest.mark.parametrize("language", LANGUAGES)
def test_an_identity_the_client_would_reject_stops_the_pod_at_start(
    commands: Commands, tmp_path: Path, language: str, env: dict[str, str]
) -> None:
    pod = ForeignPod(commands(language), tmp_path, "cp-bad", **env)
    try:
        pod.start()
        with pytest.raises(ClusterError, match="exited with 2"):
            pod.wait_ready()
    finally:
        pod.stop()
