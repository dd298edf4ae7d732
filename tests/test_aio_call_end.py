"""aio observers read a call's end without awaiting it: a call that fails before it starts
(a metadata value that is not a str) still ends its span, and nothing waits on it forever."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from affinity_fixtures import NO_WARMUP
from calls import CALL_KINDS
from channel_contract_fixtures import BAD_METADATA, METER, POINT, SESSION, SLOW_UPDATES, WAIT_S
from conftest import AioPod
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio import AffinityInterceptors, observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc


@pytest.fixture
def traced() -> Iterator[tuple[InMemorySpanExporter, ObserveOptions]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = AffinityTelemetry(tracer_provider=provider, metrics=False)
    yield exporter, ObserveOptions(registry=AffinityRegistry(NO_WARMUP), telemetry=telemetry)
    provider.shutdown()


def _start(stub: pb_grpc.ChargePointsStub, kind: str) -> Any:
    if kind == "unary_unary":
        return stub.GetChargePoint(POINT, metadata=BAD_METADATA, timeout=WAIT_S)
    if kind == "unary_stream":
        return stub.WatchStatus(SLOW_UPDATES, metadata=BAD_METADATA, timeout=WAIT_S)
    if kind == "stream_unary":
        return stub.UploadMeterValues(iter(METER), metadata=BAD_METADATA, timeout=WAIT_S)
    return stub.Session(iter(SESSION), metadata=BAD_METADATA, timeout=WAIT_S)


async def _finish(call: Any, kind: str) -> None:
    if kind.endswith("unary"):
        await call
    else:
        [_ async for _ in call]


@pytest.mark.parametrize("kind", CALL_KINDS)
@pytest.mark.parametrize("wrapper", ["observe", "interceptors"])
async def test_a_call_that_never_starts_ends_its_span(
    wrapper: str,
    kind: str,
    aio_pod: AioPod,
    traced: tuple[InMemorySpanExporter, ObserveOptions],
) -> None:
    exporter, options = traced
    interceptors = AffinityInterceptors(aio_pod.target, options)
    if wrapper == "observe":
        channel = observe(grpc.aio.insecure_channel(aio_pod.target), options, target=aio_pod.target)
    else:
        channel = grpc.aio.insecure_channel(aio_pod.target, interceptors=interceptors.interceptors)
    async with channel:
        call = _start(pb_grpc.ChargePointsStub(channel), kind)
        with pytest.raises(TypeError):
            await asyncio.wait_for(_finish(call, kind), WAIT_S)
        # Followed streams (the interceptors' header tasks) end too: nothing left to wait for.
        await asyncio.wait_for(interceptors.settle(), WAIT_S)
        # Before the channel closes: closing cancels the call, which would end it anyway.
        for _ in range(int(WAIT_S / 0.01)):
            if exporter.get_finished_spans():
                break
            await asyncio.sleep(0.01)
        assert len(exporter.get_finished_spans()) == 1
    # Closing cancelled the call that never started: still one span, one call counted.
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [span.name for span in spans]
    assert options.registry is not None
    assert options.registry.detector(aio_pod.target).snapshot().calls == 1
