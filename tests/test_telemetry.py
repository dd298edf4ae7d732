"""OpenTelemetry: spans per call kind, enrichment of the instrumentation's span, alarms, metrics."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import grpc
import pytest
from affinity_fixtures import MODES, NO_WARMUP, SYNC_WRAPPERS, call_twice, observe_sync
from calls import ABORT, CALL_KINDS, OK, call_aio, call_sync
from conftest import IDENTITY, AioPod, SyncPod
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (
    GrpcInstrumentorClient,
    aio_client_interceptors,
    client_interceptor,
    grpcext,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityRegistry,
    AffinityState,
    CallObserver,
    Transition,
)
from grpc_balance_mw.aio import interceptors as aio_client
from grpc_balance_mw.interceptors import AffinityInterceptor
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import (
    ATTR_CAUSE,
    ATTR_LANE,
    ATTR_POD,
    ATTR_STATE,
    EVENT_POD_PREFIX,
    EVENT_STATE_CHANGE,
    METRIC_CALLS,
    METRIC_TOP_SHARE,
    AffinityTelemetry,
    server_address,
)
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

FAST = AffinityConfig(min_samples=5, dwell_calls=2, warmup_s=0)
METHODS = {
    "unary_unary": "GetChargePoint",
    "unary_stream": "WatchStatus",
    "stream_unary": "UploadMeterValues",
    "stream_stream": "Session",
}

#: opentelemetry-instrumentation-grpc's (major, minor): the floors run tests an old one.
_OTEL_GRPC = tuple(
    int(part)
    for part in re.findall(r"\d+", metadata.version("opentelemetry-instrumentation-grpc"))[:2]
)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [span.name for span in spans]
    return spans[0]


@pytest.mark.parametrize("fail", [OK, ABORT], ids=["ok", "abort"])
@pytest.mark.parametrize("kind", CALL_KINDS)
@pytest.mark.parametrize("mode", MODES)
async def test_one_client_span_per_call_with_the_pod(
    mode: str,
    kind: str,
    fail: int,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    pod = await AioPod().start() if mode == "aio" else SyncPod()
    telemetry = AffinityTelemetry(tracer_provider=tracer_provider, metrics=False)
    try:
        _, seen, _ = await call_twice(
            mode,
            pod.target,
            kind,
            fail,
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=telemetry,
            lane="l1",
        )
    finally:
        stopped = pod.server.stop(None)
        if mode == "aio":
            await stopped
    span = only_span(exporter)
    assert span.name == f"chargepoints.v1.ChargePoints/{METHODS[kind]}"
    assert span.kind is SpanKind.CLIENT
    attributes = dict(span.attributes or {})
    assert attributes == {
        "rpc.system": "grpc",
        "rpc.service": "chargepoints.v1.ChargePoints",
        "rpc.method": METHODS[kind],
        "rpc.grpc.status_code": seen.code.value[0],
        "server.address": "127.0.0.1",
        "server.port": pod.port,
        ATTR_LANE: "l1",
        ATTR_POD: IDENTITY.name,
    }
    assert span.status.status_code is (StatusCode.ERROR if fail else StatusCode.UNSET)


@pytest.mark.parametrize("fail", [OK, ABORT], ids=["ok", "abort"])
def test_a_plain_call_through_the_channel_wrapper_has_its_span(
    fail: int, sync_pod: SyncPod, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    telemetry = AffinityTelemetry(tracer_provider=tracer_provider, metrics=False)
    with observe(
        grpc.insecure_channel(sync_pod.target),
        ObserveOptions(registry=AffinityRegistry(NO_WARMUP), telemetry=telemetry),
        target=sync_pod.target,
    ) as channel:
        request = pb.GetChargePointRequest(id="cp-1", fail_with_code=fail)
        with contextlib.suppress(grpc.RpcError):
            pb_grpc.ChargePointsStub(channel).GetChargePoint(request, timeout=10)
    attributes = dict(only_span(exporter).attributes or {})
    assert attributes[ATTR_POD] == IDENTITY.name
    assert attributes["rpc.grpc.status_code"] == fail


@pytest.mark.parametrize("fail", [OK, ABORT], ids=["ok", "abort"])
@pytest.mark.parametrize("kind", CALL_KINDS)
@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_sync_enriches_the_instrumentation_span_instead_of_a_second(
    wrapper: str,
    kind: str,
    fail: int,
    sync_pod: SyncPod,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    if kind == "stream_stream" and _OTEL_GRPC < (0, 62):
        pytest.skip("otel-grpc < 0.62b0 turns a sync bidi call into a bare generator (their #1180)")
    theirs = client_interceptor(tracer_provider=tracer_provider)
    with grpc.insecure_channel(sync_pod.target) as channel:
        ours, _ = observe_sync(
            channel,
            sync_pod.target,
            wrapper,
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=AffinityTelemetry(tracer_provider=tracer_provider, metrics=False),
        )
        # theirs outside, ours inside: its span is current when ours sees the call
        intercepted = grpcext.intercept_channel(ours, theirs)
        if kind == "unary_stream":
            # the instrumentation returns a bare generator for these, with no call methods
            request = pb.WatchStatusRequest(id="cp-1", updates=3, fail_with_code=fail)
            with contextlib.suppress(grpc.RpcError):
                list(pb_grpc.ChargePointsStub(intercepted).WatchStatus(request, timeout=10))
        else:
            call_sync(intercepted, kind, fail)
    span = only_span(exporter)
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.grpc"
    assert (span.attributes or {})[ATTR_POD] == IDENTITY.name


@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_aio_enriches_the_instrumentation_span_instead_of_a_second(
    kind: str, aio_pod: AioPod, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    ours = aio_client.AffinityInterceptors(
        aio_pod.target,
        ObserveOptions(
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=AffinityTelemetry(tracer_provider=tracer_provider, metrics=False),
        ),
    )
    theirs = aio_client_interceptors(tracer_provider=tracer_provider)
    async with grpc.aio.insecure_channel(
        aio_pod.target, interceptors=[*theirs, *ours.interceptors]
    ) as channel:
        await call_aio(channel, kind)
        await ours.settle()
    span = only_span(exporter)
    assert (span.attributes or {})[ATTR_POD] == IDENTITY.name


@contextlib.contextmanager
def global_tracer_provider(provider: TracerProvider) -> Iterator[None]:
    """Make ``provider`` the global one for a while (``GrpcInstrumentorClient`` ignores the
    provider it is given and uses the global one); the globals are reset as OTel's own test
    utilities reset them, since the API lets a process set them only once."""
    from opentelemetry.util._once import Once

    def reset() -> None:
        trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
        trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]

    reset()
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        reset()


@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_one_span_when_the_instrumentor_wraps_channels(
    wrapper: str,
    sync_pod: SyncPod,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    instrumentor = GrpcInstrumentorClient()
    with global_tracer_provider(tracer_provider):
        instrumentor.instrument()
        try:
            channel = grpc.insecure_channel(sync_pod.target)  # wrapped by the instrumentor
            observed, ours = observe_sync(
                channel,
                sync_pod.target,
                wrapper,
                registry=AffinityRegistry(NO_WARMUP),
                telemetry=AffinityTelemetry(tracer_provider=tracer_provider, metrics=False),
            )
            seen = call_sync(observed, "unary_unary")
            channel.close()
        finally:
            instrumentor.uninstrument()
    assert seen.code is grpc.StatusCode.OK
    assert ours.detector.snapshot().pods[IDENTITY.name].calls == 1
    span = only_span(exporter)  # the instrumentor's: never a second one of ours
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.grpc"
    if wrapper == "channel":
        # observe_channel moves the instrumentor's interceptor outside itself: enriched.
        assert (span.attributes or {})[ATTR_POD] == IDENTITY.name
    else:
        # grpc.intercept_channel puts ours outside the instrumentor's: its span has ended by the
        # time ours learns the pod, so it cannot be enriched (README: use observe_channel).
        assert ATTR_POD not in (span.attributes or {})


async def test_aio_instrumentor_span_is_enriched(
    aio_pod: AioPod, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

    instrumentor = GrpcAioInstrumentorClient()
    ours = aio_client.AffinityInterceptors(
        aio_pod.target,
        ObserveOptions(
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=AffinityTelemetry(tracer_provider=tracer_provider, metrics=False),
        ),
    )
    with global_tracer_provider(tracer_provider):
        instrumentor.instrument(tracer_provider=tracer_provider)
        try:
            # The instrumentor puts its interceptors before the ones given: outside ours.
            async with grpc.aio.insecure_channel(
                aio_pod.target, interceptors=ours.interceptors
            ) as channel:
                seen = await call_aio(channel, "unary_unary")
        finally:
            instrumentor.uninstrument()
    assert seen.code is grpc.StatusCode.OK
    span = only_span(exporter)
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.grpc"
    assert (span.attributes or {})[ATTR_POD] == IDENTITY.name


@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_alarm_event_once_per_state_change_and_state_on_later_spans(
    wrapper: str,
    sync_pod: SyncPod,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alarms: list[Transition] = []
    telemetry = AffinityTelemetry(
        tracer_provider=tracer_provider, metrics=False, on_alarm=alarms.append
    )
    caplog.set_level(logging.WARNING, logger="grpc_balance_mw.telemetry")
    with grpc.insecure_channel(sync_pod.target) as channel:
        observed, _ = observe_sync(
            channel,
            sync_pod.target,
            wrapper,
            config=FAST,
            expected_pods=3,
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=telemetry,
        )
        for _ in range(30):
            call_sync(observed, "unary_unary")
    spans = exporter.get_finished_spans()
    with_event = [
        i for i, span in enumerate(spans) if any(e.name == EVENT_STATE_CHANGE for e in span.events)
    ]
    assert with_event == [FAST.min_samples + FAST.dwell_calls - 2]
    (event,) = [e for e in spans[with_event[0]].events if e.name == EVENT_STATE_CHANGE]
    assert (event.attributes or {})[ATTR_CAUSE] == "single_connection"
    # The first call's span marks its pod as newly known.
    (added,) = spans[0].events
    assert added.name == EVENT_POD_PREFIX + "pod_added"
    assert (event.attributes or {})[ATTR_STATE] == "pinned"
    assert all((s.attributes or {}).get(ATTR_STATE) == "pinned" for s in spans[with_event[0] :])
    assert not any(ATTR_STATE in (s.attributes or {}) for s in spans[: with_event[0]])
    assert telemetry.flush(10)  # on_alarm runs on a thread of its own
    assert [(a.previous, a.current) for a in alarms] == [
        (AffinityState.UNVERIFIED, AffinityState.PINNED)
    ]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pinned" in warnings[0].getMessage()
    assert "headless Service" in warnings[0].getMessage()


def _finish(observer: CallObserver, pod: str, code: int = 0) -> Transition | None:
    return observer.begin("/svc.S/M", "unary_unary").finish([("x-balance-pod", pod)], None, code)


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_metrics_count_calls_by_pod_with_a_cap_and_report_top_share() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    telemetry = AffinityTelemetry(meter_provider=provider, spans=False, max_pod_values=2)
    observer = CallObserver(AffinityDetector("svc:1", FAST), telemetry=telemetry)
    for pod in ["p0", "p1", "p0", "p2", "p3", "p0"]:
        _finish(observer, pod)
    observer.begin("/svc.S/M", "unary_unary").finish(None, None, 14)
    by_pod = {
        (p.attributes[ATTR_POD], p.attributes.get("rpc.grpc.status_code")): p.value
        for p in _points(reader, METRIC_CALLS)
    }
    assert by_pod == {("p0", 0): 3, ("p1", 0): 1, ("other", 0): 2, ("unknown", 14): 1}
    (gauge,) = _points(reader, METRIC_TOP_SHARE)
    assert gauge.value == pytest.approx(3 / 6) and gauge.attributes == {
        "grpc_balance_mw.target": "svc:1"
    }
    provider.shutdown()


class _BrokenTracer(trace.Tracer):
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        raise RuntimeError("exporter on fire")

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("exporter on fire")


class _BrokenProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _BrokenTracer()


@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_broken_telemetry_and_callback_never_reach_the_call(
    wrapper: str, sync_pod: SyncPod
) -> None:
    def on_alarm(transition: Transition) -> None:
        raise RuntimeError("user hook on fire")

    telemetry = AffinityTelemetry(tracer_provider=_BrokenProvider(), on_alarm=on_alarm)
    with grpc.insecure_channel(sync_pod.target) as channel:
        observed, watcher = observe_sync(
            channel,
            sync_pod.target,
            wrapper,
            config=FAST,
            expected_pods=2,
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=telemetry,
        )
        codes = {call_sync(observed, kind).code for kind in CALL_KINDS * 5}
        stub = pb_grpc.ChargePointsStub(observed)
        stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1"), timeout=10)
    assert codes == {grpc.StatusCode.OK}
    assert watcher.detector.state is AffinityState.PINNED


def test_warning_is_rate_limited_per_target(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    telemetry = AffinityTelemetry(spans=False, metrics=False, clock=lambda: clock[0])
    detector = AffinityDetector(
        "svc:1", AffinityConfig(window_calls=10, min_samples=5, dwell_calls=2, warmup_s=0)
    )
    detector.expected_pods = 2
    caplog.set_level(logging.WARNING, logger="grpc_balance_mw.telemetry")
    # A channel per stretch: one pinned, one balanced per request, and so on.
    for pods in ["a" * 8, "ab" * 8, "a" * 16, "ab" * 8]:
        observer = CallObserver(detector, telemetry=telemetry)
        for pod in pods:
            _finish(observer, pod)
    assert len(caplog.records) == 1  # pinned twice within the interval
    clock[0] = 1000.0
    observer = CallObserver(detector, telemetry=telemetry)
    for pod in "a" * 16:
        _finish(observer, pod)
    assert len(caplog.records) == 2


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("127.0.0.1:5051", ("127.0.0.1", 5051)),
        ("[::1]:80", ("::1", 80)),
        ("dns:///cp.ev.svc:50051", ("cp.ev.svc", 50051)),
        ("dns://127.0.0.1:53/cp.ev.svc.cluster.local:9000", ("cp.ev.svc.cluster.local", 9000)),
        ("ipv4:10.0.0.1:80,10.0.0.2:80", ("10.0.0.1", 80)),
        ("cp.ev.svc", ("cp.ev.svc", None)),
    ],
)
def test_server_address(target: str, address: tuple[str, int | None]) -> None:
    assert server_address(target) == address


_GRPCIO = tuple(int(part) for part in grpc.__version__.split(".")[:2])


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_an_interceptor_on_two_channels_names_each_channels_lane_on_its_spans(
    mode: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """One interceptor, named lane ``omni``, on two channels: the detector counts two lanes
    (``omni`` and ``omni.1``), and each call's span names the lane of the channel it ran on.
    An old grpc.aio (before 1.60) hides the channel from an interceptor: one lane then, as
    documented, and every span names it."""
    pod = await AioPod().start() if mode == "aio" else SyncPod()
    options = ObserveOptions(
        registry=AffinityRegistry(NO_WARMUP),
        lane="omni",
        telemetry=AffinityTelemetry(tracer_provider=tracer_provider, metrics=False),
    )
    request = pb.GetChargePointRequest(id="cp-1")
    try:
        if mode == "aio":
            interceptors = aio_client.AffinityInterceptors(pod.target, options)
            async with (
                grpc.aio.insecure_channel(pod.target, interceptors=interceptors.interceptors) as a,
                grpc.aio.insecure_channel(pod.target, interceptors=interceptors.interceptors) as b,
            ):
                for channel in (a, b, a):
                    await pb_grpc.ChargePointsStub(channel).GetChargePoint(request, timeout=10)
                await interceptors.settle()
            detector = interceptors.detector
            lanes = interceptors.observer.channel_lanes
            found = lanes is not None and len(lanes) > 0
            assert found or _GRPCIO < (1, 60), "grpc.aio's layout changed: no channel found"
        else:
            interceptor = AffinityInterceptor(pod.target, options)
            with grpc.insecure_channel(pod.target) as a, grpc.insecure_channel(pod.target) as b:
                channels = [grpc.intercept_channel(c, interceptor) for c in (a, b)]
                for channel in (channels[0], channels[1], channels[0]):
                    pb_grpc.ChargePointsStub(channel).GetChargePoint(request, timeout=10)
            detector = interceptor.detector
            found = True
    finally:
        stopped = pod.server.stop(None)
        if mode == "aio":
            await stopped
    spans = exporter.get_finished_spans()
    names = [dict(span.attributes or {}).get(ATTR_LANE) for span in spans]
    assert names == (["omni", "omni.1", "omni"] if found else ["omni"] * 3)
    assert detector.snapshot().lanes == (2 if found else 1)
