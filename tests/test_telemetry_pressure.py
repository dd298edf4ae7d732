"""Telemetry under pressure: span attributes that stay with their channel, alarms off the call's
path and bounded, providers that fail, stale windows on the gauge."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from affinity_fixtures import NO_WARMUP, SYNC_WRAPPERS, observe_sync
from calls import CALL_KINDS, call_sync
from conftest import SyncPod
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityRegistry,
    AffinityState,
    CallObserver,
    Transition,
)
from grpc_balance_mw.telemetry import ATTR_LANE, ATTR_TARGET, METRIC_TOP_SHARE, AffinityTelemetry

FAST = AffinityConfig(min_samples=5, dwell_calls=2, warmup_s=0)
#: A small window, so that a server can make the state flap every few calls.
FLAPPY = AffinityConfig(window_calls=10, min_samples=5, dwell_calls=2, warmup_s=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def exporter() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter, provider
    provider.shutdown()


def _finish(observer: CallObserver, pod: str | None) -> Transition | None:
    metadata = [("x-balance-pod", pod)] if pod is not None else None
    return observer.begin("/svc.S/M", "unary_unary").finish(metadata, None, 0)


def test_a_new_channel_never_inherits_a_dropped_channels_lane(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    spans, provider = exporter
    telemetry = AffinityTelemetry(tracer_provider=provider, metrics=False)
    detector = AffinityDetector("svc:1", FAST)
    gone = []
    for i in range(300):  # ids of dropped observers are reused by new ones
        observer = CallObserver(detector, telemetry=telemetry, lane=f"lane-{i}")
        _finish(observer, "p0")
        (span,) = spans.get_finished_spans()
        spans.clear()
        assert (span.attributes or {})[ATTR_LANE] == f"lane-{i}"
        gone.append(weakref.ref(observer))
        del observer
    gc.collect()
    assert not any(ref() is not None for ref in gone)  # the telemetry kept none of them
    assert repr(telemetry) == "<AffinityTelemetry watching 0 targets>"


def test_span_attributes_are_bounded_per_channel(
    exporter: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    _, provider = exporter
    telemetry = AffinityTelemetry(tracer_provider=provider, metrics=False)
    observer = CallObserver(AffinityDetector("svc:1", FAST), telemetry=telemetry)
    for i in range(2000):  # a generic client calling made-up methods
        observer.begin(f"/svc.S/M{i}", "unary_unary").finish(None, None, 0)
    assert len(observer.telemetry_cache) <= 258


def _flapping(observer: CallObserver, rounds: int) -> None:
    """Pinned on "a", then not, ``rounds`` times (two state changes a round).

    Each stretch comes from a lane of its own (a channel per stretch): one lane that switched
    pods every call would read as balanced per request, and not flap."""
    for _ in range(rounds):
        for stretch in ("a" * 12, "ab" * 5):
            lane = CallObserver(observer.detector, telemetry=observer.telemetry)
            for pod in stretch:
                _finish(lane, pod)


def _flappy_detector() -> AffinityDetector:
    detector = AffinityDetector("svc:1", FLAPPY)
    detector.expected_pods = 2
    return detector


def test_on_alarm_runs_off_the_calls_path() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_hook(_transition: Transition) -> None:
        entered.set()
        release.wait(30)

    telemetry = AffinityTelemetry(spans=False, metrics=False, on_alarm=slow_hook)
    detector = AffinityDetector("svc:1", FAST)
    detector.expected_pods = 2
    observer = CallObserver(detector, telemetry=telemetry)
    transitions = [_finish(observer, "a") for _ in range(10)]
    assert any(t is not None for t in transitions)  # the alarm was raised by these calls
    assert entered.wait(10)  # the hook runs ...
    assert not release.is_set()  # ... and is still blocked while every call has returned
    release.set()
    assert telemetry.flush(10)


def test_a_slow_on_alarm_drops_and_counts_alarms_beyond_its_queue() -> None:
    release = threading.Event()
    telemetry = AffinityTelemetry(
        spans=False,
        metrics=False,
        on_alarm=lambda _t: release.wait(30) and None,
        alarm_interval_s=0,
        max_pending_alarms=3,
    )
    _flapping(CallObserver(_flappy_detector(), telemetry=telemetry), rounds=10)
    assert telemetry.alarms_dropped > 0
    release.set()
    assert telemetry.flush(10)


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_whatever_on_alarm_raises_never_reaches_the_call(
    wrapper: str, error: type[BaseException], sync_pod: SyncPod
) -> None:
    raised = threading.Event()

    def on_alarm(_transition: Transition) -> None:
        raised.set()
        raise error("user hook on fire")

    telemetry = AffinityTelemetry(spans=False, metrics=False, on_alarm=on_alarm)
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
        codes = {call_sync(observed, kind).code for kind in CALL_KINDS * 3}
    assert codes == {grpc.StatusCode.OK}
    assert telemetry.flush(10) and raised.is_set()
    assert watcher.detector.state is AffinityState.PINNED


def test_info_logs_and_on_alarm_are_rate_limited_per_target(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    alarms: list[Transition] = []
    telemetry = AffinityTelemetry(
        spans=False, metrics=False, on_alarm=alarms.append, alarm_interval_s=60, clock=clock
    )
    observer = CallObserver(_flappy_detector(), telemetry=telemetry)
    caplog.set_level(logging.INFO, logger="grpc_balance_mw.telemetry")
    _flapping(observer, rounds=20)  # about 80 state changes at one instant
    assert telemetry.flush(10)
    assert len(alarms) == 1 and telemetry.alarms_suppressed >= 30
    state_logs = [r for r in caplog.records if r.levelno == logging.INFO and " now (" in r.message]
    assert len(state_logs) <= 1
    clock.now += 61
    _flapping(observer, rounds=1)
    assert telemetry.flush(10)
    assert len(alarms) == 2


class _RaisingTracerProvider(trace.TracerProvider):
    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        raise RuntimeError("tracer provider on fire")


class _RaisingMeterProvider(otel_metrics.MeterProvider):
    def get_meter(self, *args: Any, **kwargs: Any) -> otel_metrics.Meter:
        raise RuntimeError("meter provider on fire")


def test_providers_that_raise_never_make_the_constructor_raise(sync_pod: SyncPod) -> None:
    telemetry = AffinityTelemetry(
        tracer_provider=_RaisingTracerProvider(), meter_provider=_RaisingMeterProvider()
    )
    with grpc.insecure_channel(sync_pod.target) as channel:
        observed, watcher = observe_sync(
            channel,
            sync_pod.target,
            "channel",
            registry=AffinityRegistry(NO_WARMUP),
            telemetry=telemetry,
        )
        assert call_sync(observed, "unary_unary").code is grpc.StatusCode.OK
    assert watcher.detector.snapshot().calls == 1


def test_the_gauge_reports_a_stale_window_and_so_does_on_alarm() -> None:
    clock = FakeClock()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    alarms: list[Transition] = []
    telemetry = AffinityTelemetry(
        meter_provider=provider, spans=False, on_alarm=alarms.append, clock=clock
    )
    detector = AffinityDetector("svc:1", FAST, clock=clock)
    detector.expected_pods = 2
    observer = CallObserver(detector, telemetry=telemetry, clock=clock)
    for _ in range(10):
        _finish(observer, "a")
    assert _top_share(reader) == 1.0
    clock.now += 3600  # the calls stopped an hour ago
    assert _top_share(reader) == 0.0
    assert telemetry.flush(10)
    assert [(a.current, a.stale) for a in alarms] == [
        (AffinityState.PINNED, False),
        (AffinityState.UNVERIFIED, True),
    ]
    provider.shutdown()


def _top_share(reader: InMemoryMetricReader) -> float:
    data = reader.get_metrics_data()
    assert data is not None
    (point,) = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == METRIC_TOP_SHARE
        for point in metric.data.data_points
    ]
    assert point.attributes == {ATTR_TARGET: "svc:1"}
    return float(point.value)
