"""The balanced channel, sync and aio, against the local cluster: spread, call kinds, scale-up,
rotation under load, session affinity, pod loss, close.

Every claim about where calls went is the pods' own count (``cluster.served()``). Waits are
bounded loops on a condition, never assertions on time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from calls import CALL_KINDS, call_aio, call_sync
from conftest import IDENTITY, require
from fault_load import count_calls, covered, covering, threads_left, threads_now, until
from leak_fixtures import server_with_own_workers
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw import server as sync_server
from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import PoolConfig, rotate_after_age, rotate_after_calls
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME, SyncChargePointsServicer
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.leaks_per_module(
        reason="module-scoped pods: admin connections and executor threads start when used"
    ),
]

MODES = ("sync", "aio")
Factory = Callable[..., LocalCluster]
Body = Callable[[Any, "Calls"], Awaitable[None]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        yield running


class Calls:
    """Calls on a balanced channel the same way in both modes (sync ones run in a thread)."""

    def __init__(self, mode: str, channel: Any) -> None:
        self.mode = mode
        self.channel = channel

    async def one(self, kind: str = "unary_unary") -> grpc.StatusCode:
        if self.mode == "sync":
            seen = await asyncio.to_thread(call_sync, self.channel, kind)
        else:
            seen = await call_aio(self.channel, kind)
        return seen.code

    async def many(self, count: int, kind: str = "unary_unary") -> list[grpc.StatusCode]:
        if self.mode == "sync":  # one thread for the whole batch: to_thread per call is slow
            return await asyncio.to_thread(
                lambda: [call_sync(self.channel, kind).code for _ in range(count)]
            )
        return [await self.one(kind) for _ in range(count)]


def run(mode: str, target: str, body: Body, **kwargs: Any) -> None:
    """Open a balanced channel in ``mode``, run ``body(channel, calls)``, close it."""

    async def main() -> None:
        if mode == "sync":
            channel: Any = balanced_channel(target, **kwargs)
        else:
            channel = aio_balanced_channel(target, **kwargs)
        try:
            await body(channel, Calls(mode, channel))
        finally:
            if mode == "sync":
                channel.close()
            else:
                await channel.close()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", CALL_KINDS)
def test_every_call_kind_works_and_spreads_over_the_pods(
    cluster: LocalCluster, mode: str, kind: str
) -> None:
    async def body(channel: Any, calls: Calls) -> None:
        assert await covering(calls.mode, channel), channel
        cluster.reset_counts()
        # Sequential calls stay on a lane for runs of 16 (LeastOutstanding's run): 3 runs+.
        assert set(await calls.many(60, kind)) == {grpc.StatusCode.OK}
        served = cluster.served()
        assert all(served.values()), served
        assert sum(served.values()) == 60

    run(mode, cluster.service_target, body, observe=ObserveOptions(expected_pods=3))


@pytest.mark.parametrize("service", ["userspace", "haproxy", "iptables"])
def test_one_balanced_channel_spreads_where_a_plain_one_pins(
    local_cluster_factory: Factory, service: str
) -> None:
    cluster = local_cluster_factory(pods=3, service=service, dns=None)
    with grpc.insecure_channel(cluster.service_target) as plain:
        for _ in range(30):
            call_sync(plain, "unary_unary")
    assert sorted(cluster.served().values()) == [0, 0, 30]
    cluster.reset_counts()

    for mode in MODES:

        async def body(channel: Any, calls: Calls) -> None:
            assert await until(lambda: len(covered(channel)) == 3), channel
            assert set(await calls.many(90)) == {grpc.StatusCode.OK}

        run(mode, cluster.service_target, body)
    served = cluster.served()
    assert sum(served.values()) == 180 and all(served.values()), served


@pytest.mark.parametrize("mode", MODES)
def test_new_pods_get_traffic_within_5_s_of_a_scale_up_by_the_scouts_alone(
    local_cluster_factory: Factory, mode: str
) -> None:
    """Both new pods of a 3 -> 5 scale-up serve calls within 5 s with the default pool and
    rotation (every 60 s, so no rotation helps): a scout finds one, its burst the other
    (missed with p = 0.024 %, see PoolConfig)."""
    cluster = local_cluster_factory(pods=3, dns=None)
    period_s = 5.0

    async def body(channel: Any, calls: Calls) -> None:
        assert await until(lambda: len(covered(channel)) == 3), channel
        cluster.scale(5)
        cluster.reset_counts()
        scaled_at = time.monotonic()
        new = ["charge-points-3", "charge-points-4"]
        while time.monotonic() - scaled_at < period_s:
            await calls.many(10)
            if all(cluster.served().get(pod) for pod in new):
                break
        served = cluster.served()
        logging.getLogger(__name__).info(
            "new pods served %.2f s after the scale-up", time.monotonic() - scaled_at
        )
        assert all(served.get(pod) for pod in new), (served, channel)

    run(mode, cluster.service_target, body)


@pytest.mark.parametrize("mode", MODES)
def test_rotating_under_load_drops_no_call_and_cuts_no_stream(
    cluster: LocalCluster, mode: str
) -> None:
    updates = 20  # a 2 s stream, held open across several rotations

    async def stream(channel: Any) -> int:
        request = pb.WatchStatusRequest(id="cp-1", updates=updates, interval_ms=100)
        if mode == "sync":

            def read() -> int:
                return len(list(pb_grpc.ChargePointsStub(channel).WatchStatus(request, timeout=20)))

            return await asyncio.to_thread(read)
        call = pb_grpc.ChargePointsStub(channel).WatchStatus(request, timeout=20)
        return len([update async for update in call])

    async def body(channel: Any, calls: Calls) -> None:
        streams = [asyncio.ensure_future(stream(channel)) for _ in range(4)]
        codes: list[grpc.StatusCode] = []
        while not all(s.done() for s in streams):
            codes += await calls.many(20)
        assert await asyncio.gather(*streams) == [updates] * 4
        assert set(codes) == {grpc.StatusCode.OK}
        assert channel.pool.rotations >= 6, channel  # lanes live 0.4-0.6 s
        await until(lambda: all(lane.is_idle() for lane in channel.pool.lanes))

    run(
        mode,
        cluster.service_target,
        body,
        rotation=rotate_after_age(0.5),
        pool_config=PoolConfig(expected_pods=3, scout_interval_s=None),
    )


@pytest.mark.parametrize("mode", MODES)
def test_client_ip_session_affinity_is_recognised_and_redialling_stops(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(pods=3, service="iptables", session_affinity="ClientIP")

    async def body(channel: Any, calls: Calls) -> None:
        def settled() -> bool:
            pending = any(lane.is_pending() for lane in channel.pool.lanes)
            return channel.stuck is not None and not pending

        assert await until(settled, 20), channel
        assert channel.stuck.cause == "session-affinity"
        dials = channel.pool.dials
        assert set(await calls.many(30)) == {grpc.StatusCode.OK}
        # A negative claim: four maintenance rounds plan their work, and none dials or scouts.
        plans = count_calls(channel.pool, "plan")
        assert await until(lambda: len(plans) >= 4, 10), plans
        assert channel.pool.dials == dials
        assert "stuck (session-affinity)" in repr(channel)

    with caplog.at_level(logging.WARNING):
        run(mode, cluster.service_target, body, observe=ObserveOptions(expected_pods=3))
    assert "sessionAffinity: ClientIP" in caplog.text
    assert list(cluster.served().values()).count(0) == 2  # it really is pinned


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_pod_loses_its_lane_and_calls_carry_on(
    local_cluster_factory: Factory, mode: str
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None)

    async def body(channel: Any, calls: Calls) -> None:
        assert await until(lambda: len(covered(channel)) == 3), channel
        cluster.kill("charge-points-1")
        failed = [code for code in await calls.many(60) if code is not grpc.StatusCode.OK]
        assert set(failed) <= {grpc.StatusCode.UNAVAILABLE} and len(failed) <= 3, failed
        assert await until(lambda: covered(channel) == {"charge-points-0", "charge-points-2"})
        cluster.reset_counts()
        assert set(await calls.many(30)) == {grpc.StatusCode.OK}
        assert sorted(cluster.served()) == ["charge-points-0", "charge-points-2"]

    run(
        mode,
        cluster.service_target,
        body,
        # A lane whose connection silently reconnected elsewhere is relabelled by its next check.
        pool_config=PoolConfig(expected_pods=3, health_interval_s=1.0),
    )


@pytest.mark.parametrize("mode", MODES)
def test_a_pod_gone_not_serving_is_rotated_away_from_without_a_failed_call(
    local_cluster_factory: Factory, mode: str
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None)

    async def body(channel: Any, calls: Calls) -> None:
        assert await covering(calls.mode, channel), channel
        cluster.set_serving("charge-points-1", False)  # out of the Service, still running
        codes: list[grpc.StatusCode] = []
        while "charge-points-1" in covered(channel) and len(codes) < 2000:
            codes += await calls.many(10)
        assert set(codes) <= {grpc.StatusCode.OK}
        assert covered(channel) == {"charge-points-0", "charge-points-2"}, channel
        cluster.reset_counts()
        assert set(await calls.many(30)) == {grpc.StatusCode.OK}
        assert cluster.served()["charge-points-1"] == 0

    run(
        mode,
        cluster.service_target,
        body,
        pool_config=PoolConfig(expected_pods=3, health_interval_s=0.5),
    )


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", MODES)
def test_close_leaves_no_thread_task_or_connection_after_many_rotations(
    cluster: LocalCluster, mode: str
) -> None:
    run(mode, cluster.service_target, lambda channel, calls: calls.many(5))  # warm grpc up
    threads, fds = threads_now(), _fds()

    async def body(channel: Any, calls: Calls) -> None:
        deadline = time.monotonic() + 20
        while channel.pool.rotations < 24 and time.monotonic() < deadline:
            await calls.many(20)
        assert channel.pool.rotations >= 24, channel

    run(
        mode,
        cluster.service_target,
        body,
        rotation=rotate_after_calls(10),
        pool_config=PoolConfig(expected_pods=3, scout_interval_s=None),
    )
    assert not [t for t in threading.enumerate() if t.name.startswith("balanced-channel")]
    assert not threads_left(threads)
    assert _fds() <= fds + 4, (fds, _fds())


def test_stubs_futures_and_intercept_channel_take_it_as_it_is(cluster: LocalCluster) -> None:
    class Tag(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        def __init__(self) -> None:
            self.calls = 0

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            self.calls += 1
            return continuation(details, request)

    tag = Tag()
    with balanced_channel(
        cluster.service_target, observe=ObserveOptions(expected_pods=3)
    ) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)  # subscribe / unsubscribe
        stub = pb_grpc.ChargePointsStub(grpc.intercept_channel(channel, tag))
        futures = [stub.GetChargePoint.future(pb.GetChargePointRequest(id="x")) for _ in range(20)]
        assert all(f.result(timeout=10).id == "x" for f in futures)
        assert tag.calls == 20
        assert asyncio.run(until(lambda: all(lane.is_idle() for lane in channel.pool.lanes)))
        assert repr(channel).startswith(f"<BalancedChannel {cluster.service_target} <LanePool ")
    with pytest.raises(ValueError, match="closed"):
        stub.GetChargePoint(pb.GetChargePointRequest(id="x"))


@pytest.fixture(scope="module")
def tls_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """A pod that only speaks TLS (a plaintext redial would fail), and its certificate."""
    require(shutil.which("openssl") is not None, "openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = server_with_own_workers(8, interceptors=[sync_server.PodIdentityInterceptor(IDENTITY)])
    pb_grpc.add_ChargePointsServicer_to_server(SyncChargePointsServicer(IDENTITY.name), server)
    sync_server.add_health(server, services=(SERVICE_NAME,))
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}", cert.read_bytes()
    server.stop(None).wait()


@pytest.mark.parametrize("mode", MODES)
def test_tls_credentials_are_used_for_every_redial(tls_pod: tuple[str, bytes], mode: str) -> None:
    target, cert = tls_pod

    async def body(channel: Any, calls: Calls) -> None:
        deadline = time.monotonic() + 10
        while channel.pool.rotations < 10 and time.monotonic() < deadline:
            assert set(await calls.many(20)) == {grpc.StatusCode.OK}
        assert channel.pool.rotations >= 10, channel
        # Replacements were activated: their health check (over TLS) named the pod.
        active = [lane for lane in channel.pool.lanes if lane.is_available()]
        assert active and all(lane.id > 6 and lane.pod == IDENTITY.name for lane in active)

    run(
        mode,
        target,
        body,
        credentials=grpc.ssl_channel_credentials(root_certificates=cert),
        options=[("grpc.ssl_target_name_override", "localhost")],
        rotation=rotate_after_calls(5),
        # One pod: without a large affinity_dials the pool would find every fresh connection
        # on it ("one pod or ClientIP") and stop redialling, rotations included.
        pool_config=PoolConfig(min_lanes=2, scout_interval_s=None, affinity_dials=1000),
    )


def test_aio_connectivity_methods_answer_for_a_lane(cluster: LocalCluster) -> None:
    # Made outside a running loop, as a module-level channel is: the first use opens the lanes
    # in the loop that uses them (grpc.aio channels belong to one loop).
    made_early = aio_balanced_channel(cluster.service_target)

    async def main() -> None:
        async with made_early as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            assert repr(channel).startswith("<BalancedChannel ")
        with pytest.raises(ValueError, match="closed"):
            pb_grpc.ChargePointsStub(channel).GetChargePoint(pb.GetChargePointRequest(id="x"))

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_spans_carry_the_pod_and_lane_and_health_checks_make_none(
    cluster: LocalCluster, mode: str
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = AffinityTelemetry(tracer_provider=provider, metrics=False)
    lanes: dict[str, str | None] = {}

    async def body(channel: Any, calls: Calls) -> None:
        assert await until(lambda: len(covered(channel)) == 3), channel
        await asyncio.sleep(0.6)  # a scout or two made their health checks
        for kind in ("unary_unary", "unary_stream"):
            assert set(await calls.many(20, kind)) == {grpc.StatusCode.OK}
        lanes.update({lane.name: lane.pod for lane in channel.pool.lanes})

    run(
        mode,
        cluster.service_target,
        body,
        observe=ObserveOptions(telemetry=telemetry, registry=AffinityRegistry()),
        pool_config=PoolConfig(expected_pods=3, health_interval_s=0.2),
    )
    provider.shutdown()
    spans = exporter.get_finished_spans()
    assert len(spans) == 40, sorted({span.name for span in spans})
    for span in spans:
        attributes = dict(span.attributes or {})
        assert span.name.startswith("chargepoints.v1.ChargePoints/")
        lane = attributes["grpc_balance_mw.lane"]
        assert isinstance(lane, str) and lanes[lane] == attributes["grpc_balance_mw.pod"]
