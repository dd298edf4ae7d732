"""The server middleware puts an ORCA load report in every call's trailer: sync and aio, every
call kind and outcome, merged with the handler's own trailers, never breaking a call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import ABORT, CALL_KINDS, OK, RAISE, call_aio
from conftest import IDENTITY
from fault_load import until
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import POD_HEADER, ObserveOptions, observe
from grpc_balance_mw import server as sync_server
from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.aio import observe as aio_observe
from grpc_balance_mw.aio import server as aio_server
from grpc_balance_mw.load_meter import LoadMeter
from grpc_balance_mw.orca import GRPCIO_TRAILER_KEY, LoadReport, decode_load_report
from grpc_balance_mw.testing.charge_points.pod import load_meter_for
from grpc_balance_mw.testing.charge_points.servicer import (
    SERVICE_NAME,
    ChargePointsServicer,
    SyncChargePointsServicer,
)
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.testing.pods import Pod as ClusterPod
from grpc_balance_mw.testing.pods import PodSettings

OUTCOMES = {
    OK: grpc.StatusCode.OK,
    ABORT: grpc.StatusCode.FAILED_PRECONDITION,
    RAISE: grpc.StatusCode.UNKNOWN,
}
HOLD, OWN_TRAILER, ABORT_OWN = "/test.Load/Hold", "/test.Load/OwnTrailer", "/test.Load/AbortOwn"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
WAIT_S = 10.0


class Pod:
    """A sync or aio server with the identity interceptor and ``meter``, serving charge points,
    health, and three test methods: ``Hold`` (until :meth:`release`), ``OwnTrailer`` (sets its
    own trailing metadata) and ``AbortOwn`` (aborts with its own trailing metadata)."""

    def __init__(self, mode: str, meter: LoadMeter) -> None:
        self.mode = mode
        self.meter = meter
        self._sync_release = threading.Event()
        self._aio_release = asyncio.Event()

    async def start(self) -> Pod:
        if self.mode == "sync":
            interceptor: Any = sync_server.PodIdentityInterceptor(IDENTITY, load_meter=self.meter)
            self.server: Any = server_with_own_workers(8, interceptors=[interceptor])
            pb_grpc.add_ChargePointsServicer_to_server(
                SyncChargePointsServicer(IDENTITY.name), self.server
            )
            self.server.add_generic_rpc_handlers((self._handlers(self._sync_methods()),))
            sync_server.add_health(self.server, services=(SERVICE_NAME,))
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.server.start()
        else:
            interceptor = aio_server.PodIdentityInterceptor(IDENTITY, load_meter=self.meter)
            self.server = grpc.aio.server(interceptors=[interceptor])
            pb_grpc.add_ChargePointsServicer_to_server(
                ChargePointsServicer(IDENTITY.name), self.server
            )
            self.server.add_generic_rpc_handlers((self._handlers(self._aio_methods()),))
            await aio_server.add_health(self.server, services=(SERVICE_NAME,))
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            await self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        self.release()
        if self.mode == "sync":
            await asyncio.to_thread(self.server.stop, None)
        else:
            await self.server.stop(None)

    def release(self) -> None:
        self._sync_release.set()
        self._aio_release.set()

    @staticmethod
    def _handlers(methods: dict[str, Any]) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Load",
            {name: grpc.unary_unary_rpc_method_handler(b) for name, b in methods.items()},
        )

    def _sync_methods(self) -> dict[str, Any]:
        def hold(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._sync_release.wait(WAIT_S)
            return request

        def own_trailer(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.set_trailing_metadata((("x-own", "kept"),))
            return request

        def abort_own(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.set_trailing_metadata((("x-own", "kept"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
            raise AssertionError("unreachable")

        return {"Hold": hold, "OwnTrailer": own_trailer, "AbortOwn": abort_own}

    def _aio_methods(self) -> dict[str, Any]:
        async def hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await asyncio.wait_for(self._aio_release.wait(), WAIT_S)
            return request

        async def own_trailer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            context.set_trailing_metadata((("x-own", "kept"),))
            return request

        async def abort_own(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("x-own", "kept"),))
            raise AssertionError("unreachable")

        return {"Hold": hold, "OwnTrailer": own_trailer, "AbortOwn": abort_own}


@pytest.fixture(params=["sync", "aio"])
async def pod(request: pytest.FixtureRequest) -> AsyncIterator[Pod]:
    started = await Pod(request.param, LoadMeter(capacity=4)).start()
    yield started
    await started.stop()


@pytest.fixture
async def channel(pod: Pod) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(pod.target) as opened:
        yield opened


def report_in(trailing: Any) -> LoadReport:
    values = [value for key, value in tuple(trailing or ()) if key == GRPCIO_TRAILER_KEY]
    assert len(values) == 1, f"one load report expected in {trailing}"
    return decode_load_report(values[0])


async def call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryCall:
    done = channel.unary_unary(method)(b"x", timeout=WAIT_S)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await done
    return done


@pytest.mark.parametrize("fail", list(OUTCOMES), ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_every_call_carries_a_report(
    pod: Pod, channel: grpc.aio.Channel, kind: str, fail: int
) -> None:
    seen = await call_aio(channel, kind, fail)
    assert seen.code == OUTCOMES[fail]
    assert seen.trailing[POD_HEADER] == IDENTITY.name
    report = report_in(seen.trailing.items())
    assert report.rps_fractional > 0
    assert report.named_metrics["in_flight"] == 0
    assert report.named_metrics["connections"] == 1
    assert (report.eps > 0) is (fail != OK)


async def test_in_flight_counts_the_calls_held_open(pod: Pod, channel: grpc.aio.Channel) -> None:
    held = [asyncio.ensure_future(call(channel, HOLD)) for _ in range(3)]
    assert await until(lambda: pod.meter.in_flight == 3, WAIT_S)
    report = report_in(await (await call(channel, OWN_TRAILER)).trailing_metadata())
    assert report.named_metrics["in_flight"] == 3
    # With a capacity of 4, the mean in flight over the window is between 0 and 3 of 4.
    assert 0 < report.application_utilization <= 3 / 4
    pod.release()
    for done in await asyncio.gather(*held):
        assert await done.code() == grpc.StatusCode.OK
    report = report_in(await (await call(channel, OWN_TRAILER)).trailing_metadata())
    assert report.named_metrics["in_flight"] == 0


async def test_the_handlers_own_trailers_are_kept(pod: Pod, channel: grpc.aio.Channel) -> None:
    done = await call(channel, OWN_TRAILER)
    trailing = tuple(await done.trailing_metadata())
    assert ("x-own", "kept") in trailing
    assert dict(trailing)[POD_HEADER] == IDENTITY.name
    report_in(trailing)


async def test_an_abort_keeps_its_status_trailers_and_report(
    pod: Pod, channel: grpc.aio.Channel
) -> None:
    done = await call(channel, ABORT_OWN)
    assert await done.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await done.details() == "full"
    trailing = tuple(await done.trailing_metadata())
    assert ("x-own", "kept") in trailing
    assert report_in(trailing).eps > 0


async def test_health_checks_carry_a_report_but_are_not_load(
    pod: Pod, channel: grpc.aio.Channel
) -> None:
    # One check is a scout's, two a new name's confirmation: they count no connection; a third
    # on the connection counts it.
    for _ in range(2):
        check = channel.unary_unary(HEALTH_CHECK)(b"", timeout=WAIT_S)
        await check
        report = report_in(await check.trailing_metadata())
        assert report.rps_fractional == 0
        assert report.named_metrics["connections"] == 0
    check = channel.unary_unary(HEALTH_CHECK)(b"", timeout=WAIT_S)
    await check
    report = report_in(await check.trailing_metadata())
    assert report.named_metrics["connections"] == 1
    assert pod.meter.report().rps_fractional == 0


class _BrokenMeter(LoadMeter):
    def end_encoded(self, failed: bool = False) -> bytes:
        raise RuntimeError("meter broke")


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_a_broken_meter_never_breaks_the_call(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    pod = await Pod(mode, _BrokenMeter(capacity=4)).start()
    try:
        async with grpc.aio.insecure_channel(pod.target) as channel:
            with caplog.at_level(logging.ERROR, logger="grpc_balance_mw._stamping"):
                seen = await call_aio(channel, "unary_unary")
    finally:
        await pod.stop()
    assert seen.code == grpc.StatusCode.OK
    assert seen.trailing[POD_HEADER] == IDENTITY.name
    assert GRPCIO_TRAILER_KEY not in seen.trailing
    assert "meter broke" in caplog.text


async def test_a_pod_at_half_speed_reports_more_utilization() -> None:
    """Two charge-points pods wired as the local cluster's are (capacity = max_concurrent), one
    at half speed, offered the same calls at the same moments: the slow one reports about twice
    the utilization (mean calls in flight over capacity)."""
    servers, channels, stubs = [], [], []
    for service_time_s in (0.04, 0.08):
        servicer = ChargePointsServicer("cp", service_time_s=service_time_s, max_concurrent=4)
        interceptor = aio_server.PodIdentityInterceptor(
            IDENTITY, load_meter=load_meter_for(servicer)
        )
        server = grpc.aio.server(interceptors=[interceptor])
        pb_grpc.add_ChargePointsServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}"))
        stubs.append(pb_grpc.ChargePointsStub(channels[-1]))
    try:
        calls = []
        for _ in range(40):  # about 25 calls a second to each pod, whatever either answers
            calls += [stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1")) for stub in stubs]
            await asyncio.sleep(0.04)
        for done in calls:
            await done
        fast, slow = [report_in(await last.trailing_metadata()) for last in calls[-2:]]
    finally:
        for opened in channels:
            await opened.close()
        for server in servers:
            await server.stop(None)
    assert fast.application_utilization > 0
    assert slow.application_utilization > 1.3 * fast.application_utilization


@pytest.mark.slow  # a pod process: about 5 s here
def test_a_local_cluster_pod_reports_its_capacity_used(tmp_path: Path) -> None:
    """The charge-points pod process (what ``LocalCluster`` runs) reports with capacity =
    ``max_concurrent``: calls held past it queue, and its utilization goes above 1."""
    pod = ClusterPod(
        "cp-0",
        "127.0.0.1",
        0,
        namespace="ev",
        settings=PodSettings(service_time_ms=300, max_concurrent=1),
        log_dir=tmp_path,
    )
    pod.start()
    try:
        with grpc.insecure_channel(pod.address) as opened:
            stub = pb_grpc.ChargePointsStub(opened)
            request = pb.GetChargePointRequest(id="cp-1")
            queued = [stub.GetChargePoint.future(request, timeout=WAIT_S) for _ in range(4)]
            for future in queued:
                future.result()
            trailing = queued[-1].trailing_metadata()
    finally:
        pod.stop()
    report = report_in(trailing)
    assert dict(trailing)[POD_HEADER] == "cp-0"
    # Four calls, one served at a time for 0.3 s each: 4, 3, 2, then 1 in flight, 3 call-seconds
    # in a window of at most 2.5 s.
    assert report.application_utilization > 1
    assert report.named_metrics["connections"] >= 1


@pytest.mark.parametrize("client", ["sync", "aio"])
async def test_a_client_reads_the_pod_from_trailers_new_on_every_call_without_keeping_them(
    pod: Pod, client: str
) -> None:
    """Every call's trailers carry a new report, so they are never a block seen before: the
    observing client reads their pod headers alone and keeps no cache entry per call (it
    kept one per call, up to 4,096, and counted each call the slow way)."""
    calls, request = 40, pb.GetChargePointRequest(id="cp-1")
    options = ObserveOptions(registry=AffinityRegistry(AffinityConfig(warmup_s=0)))
    trailers: set[Any] = set()

    def call_sync() -> CallObserver:
        with observe(grpc.insecure_channel(pod.target), options, target=pod.target) as observed:
            rpc = pb_grpc.ChargePointsStub(observed).GetChargePoint
            for _ in range(calls):
                rpc(request, timeout=WAIT_S)  # the plain call: the wrapper's leanest path
                trailers.add(rpc.with_call(request, timeout=WAIT_S)[1].trailing_metadata())
            return observed.observer

    if client == "sync":
        observer = await asyncio.to_thread(call_sync)
    else:
        async with aio_observe(
            grpc.aio.insecure_channel(pod.target), options, target=pod.target
        ) as aio_observed:
            aio_rpc = pb_grpc.ChargePointsStub(aio_observed).GetChargePoint
            for _ in range(2 * calls):
                done = aio_rpc(request, timeout=WAIT_S)
                await done
                trailers.add(tuple(await done.trailing_metadata()))
            observer = aio_observed.observer
    assert len(trailers) > calls // 2  # the reports made them new (rps and latency change)
    assert await until(lambda: observer.detector.snapshot().calls == 2 * calls, WAIT_S)
    snapshot = observer.detector.snapshot()
    assert (snapshot.unknown_calls, snapshot.malformed_calls) == (0, 0)
    assert set(snapshot.pods) == {IDENTITY.name}
    assert len(observer.reader.by_metadata) <= 2  # the headers, and no trailers per call
