"""Tracing hygiene: the package's own health checks make no span in the user's pipeline.

``suppressed()`` keeps a call out of opentelemetry-instrumentation-grpc's spans (sync and aio);
an idle balanced channel under that instrumentation makes none once its checks use it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from conftest import IDENTITY, SyncPod
from grpc_health.v1 import health_pb2, health_pb2_grpc
from leak_fixtures import server_with_own_workers
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from otel_fixtures import CHECK, FLAVOURS, global_spans, instrumented, named

import grpc_balance_mw
from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw import server as sync_server
from grpc_balance_mw._suppress import suppressed
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    with global_spans() as spans:
        yield spans


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_health_check_inside_suppressed_makes_no_otel_grpc_span(
    flavour: str, sync_pod: SyncPod, exporter: InMemorySpanExporter
) -> None:
    def check_sync(quiet: Callable[[], Any]) -> None:
        with grpc.insecure_channel(sync_pod.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with quiet():
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    async def check_aio(quiet: Callable[[], Any]) -> None:
        async with grpc.aio.insecure_channel(sync_pod.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with quiet():
                call = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            await call  # awaited outside: the context the call was started in is what counts
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    theirs = GrpcInstrumentorClient() if flavour == "sync" else GrpcAioInstrumentorClient()
    with instrumented(theirs):
        if flavour == "sync":
            check_sync(suppressed)
        else:
            asyncio.run(check_aio(suppressed))
        # The unsuppressed check's span proves spans get through; the suppressed one was
        # started (and ended) before it.
        spans = named(exporter, CHECK, 1)
        assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
        # And without suppressed(), the same two checks make two spans.
        exporter.clear()
        if flavour == "sync":
            check_sync(contextlib.nullcontext)
        else:
            asyncio.run(check_aio(contextlib.nullcontext))
        assert len(named(exporter, CHECK, 2)) == 2


class CheckCounter(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts the health checks a server was asked (the balanced channel's own traffic)."""

    def __init__(self) -> None:
        self.checks = 0

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.lstrip("/") == CHECK:
            self.checks += 1
        return continuation(details)


@pytest.fixture
def counted_pod() -> Iterator[tuple[str, CheckCounter]]:
    counter = CheckCounter()
    server = server_with_own_workers(
        4,
        interceptors=[sync_server.PodIdentityInterceptor(IDENTITY), counter],
    )
    sync_server.add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", counter
    server.stop(None).wait()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_idle_balanced_channel_makes_no_span_under_otel_grpc(
    flavour: str, counted_pod: tuple[str, CheckCounter], exporter: InMemorySpanExporter
) -> None:
    target, counter = counted_pod

    def wait_for_checks(count: int) -> None:
        deadline = time.monotonic() + 15
        while counter.checks < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counter.checks >= count, "the balanced channel made no health checks"

    async def idle_aio() -> None:
        channel = balance_aio.balanced_channel(target)
        try:
            await asyncio.get_running_loop().run_in_executor(None, wait_for_checks, 4)
        finally:
            await channel.close()

    theirs = GrpcInstrumentorClient() if flavour == "sync" else GrpcAioInstrumentorClient()
    with instrumented(theirs):
        if flavour == "sync":
            with grpc_balance_mw.balanced_channel(target):
                wait_for_checks(4)
        else:
            asyncio.run(idle_aio())
    assert [s.name for s in exporter.get_finished_spans()] == []


@pytest.mark.parametrize("kind", ["balanced", "dial_per_request"])
def test_aio_routed_channels_work_under_otel_grpc_and_trace_only_the_users_calls(
    kind: str, sync_pod: SyncPod, exporter: InMemorySpanExporter
) -> None:
    """otel-grpc's aio instrumentor wraps ``grpc.aio.insecure_channel`` and sets
    ``interceptors=`` itself: the lanes and fresh connections must be dialled by keyword."""
    target = sync_pod.target

    async def three_calls() -> None:
        make = (
            balance_aio.balanced_channel
            if kind == "balanced"
            else balance_aio.dial_per_request_channel
        )
        channel = make(target)
        try:
            stub = pb_grpc.ChargePointsStub(channel)
            for _ in range(3):
                await stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1"), timeout=5)
        finally:
            await channel.close()

    with instrumented(GrpcAioInstrumentorClient()):
        asyncio.run(three_calls())
    names = [s.name for s in exporter.get_finished_spans()]
    assert len(names) == 3 and all(name.endswith("GetChargePoint") for name in names), names
