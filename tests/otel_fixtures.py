"""What the instrumentor's tests share: spans of the global tracer provider, waiting for them,
and instrumentors switched on in an order and off in the reverse one."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_telemetry import global_tracer_provider

FLAVOURS = ("sync", "aio")
GET = "chargepoints.v1.ChargePoints/GetChargePoint"
CHECK = "grpc.health.v1.Health/Check"


@contextlib.contextmanager
def global_spans() -> Iterator[InMemorySpanExporter]:
    """Spans of the global tracer provider (otel-grpc's sync instrumentor uses only that one)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with global_tracer_provider(provider):
        yield spans
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    """The finished spans called ``name``, once ``count`` of them are there (aio spans end in
    done-callbacks), waiting at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in exporter.get_finished_spans() if s.name.lstrip("/") == name]
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


@contextlib.contextmanager
def instrumented(*instrumentors: Any, **kwargs: Any) -> Iterator[None]:
    """Instrument in this order, uninstrument in the reverse one."""
    done: list[Any] = []
    try:
        for instrumentor in instrumentors:
            instrumentor.instrument(**kwargs)
            done.append(instrumentor)
        yield
    finally:
        for instrumentor in reversed(done):
            instrumentor.uninstrument()
