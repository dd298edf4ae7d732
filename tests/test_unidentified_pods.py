"""Servers that stamp no identity are named, sync and aio; a header the fleet sends is read.

Issue 21: calls to servers without the server half left the detector ``unverified`` for good,
spans said pod ``unknown`` and nothing was logged. Now the target is ``unidentified`` within 50
calls, with one warning that names the fix, on spans, in the state metric and in the snapshot's
cause. A fleet that already returns its pod name in a header of its own is read through
``ObserveOptions(pod_headers=)``. Real servers on loopback (:class:`HeaderPod`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from affinity_fixtures import HeaderPod
from calls import call_aio, call_sync
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.affinity.advice import VOICES, Cause
from grpc_balance_mw.aio.interceptors import AffinityInterceptors
from grpc_balance_mw.aio.observed_channel import observe as aio_observe
from grpc_balance_mw.cli import build_parser, doctor
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.interceptors import AffinityInterceptor
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import ATTR_POD, ATTR_STATE, METRIC_STATE, AffinityTelemetry

CALLS = 50
MODES = ("sync", "aio")


@pytest.fixture
def unstamped() -> Iterator[HeaderPod]:
    pod = HeaderPod()
    yield pod
    pod.stop()


def _calls(mode: str, target: str, options: ObserveOptions, count: int = CALLS) -> Any:
    """``count`` unary calls through ``observe(channel, options)``; the observed channel's
    detector, after the channel is closed."""
    if mode == "sync":
        with observe(grpc.insecure_channel(target), options, target=target) as channel:
            for _ in range(count):
                assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
            return channel.detector

    async def main() -> Any:
        channel = aio_observe(grpc.aio.insecure_channel(target), options, target=target)
        try:
            for _ in range(count):
                assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
            return channel.detector
        finally:
            await channel.close()

    return asyncio.run(main())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("grpc_balance_mw")
    ]


@pytest.mark.parametrize("mode", MODES)
def test_a_server_that_stamps_nothing_is_named_once_within_50_calls(
    unstamped: HeaderPod, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="grpc_balance_mw")
    options = ObserveOptions(registry=AffinityRegistry())
    detector = _calls(mode, unstamped.target, options)
    snapshot = detector.snapshot()
    assert snapshot.state is AffinityState.UNIDENTIFIED, snapshot
    assert snapshot.cause == Cause.UNIDENTIFIED.value
    (warning,) = _warnings(caplog)
    assert "are unidentified" in warning and "grpc_balance_mw.server" in warning, warning
    assert "pod_headers=" in warning  # the other fix: the header the fleet already sends
    # Another 50 calls: the state stays, and the warning is not said again.
    _calls(mode, unstamped.target, options.but(registry=options.registry))
    assert detector.state is AffinityState.UNIDENTIFIED
    assert len(_warnings(caplog)) == 1


def test_spans_and_the_state_metric_say_unidentified(unstamped: HeaderPod) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    telemetry = AffinityTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    options = ObserveOptions(registry=AffinityRegistry(), telemetry=telemetry, probe=False)
    target = unstamped.target
    try:
        with observe(grpc.insecure_channel(target), options, target=target) as channel:
            for _ in range(CALLS):
                assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
            data = reader.get_metrics_data()  # while the channel (and its target) is watched
        spans = exporter.get_finished_spans()
        last = dict(spans[-1].attributes or {})
        assert last[ATTR_POD] == "unknown" and last[ATTR_STATE] == "unidentified", last
        assert data is not None
        states = {
            point.attributes[ATTR_STATE]: point.value
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == METRIC_STATE
            for point in metric.data.data_points
        }
        assert states["unidentified"] == 1 and states["unverified"] == 0, states
    finally:
        meter_provider.shutdown()
        tracer_provider.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_a_header_the_fleet_already_sends_names_the_pod(mode: str) -> None:
    pod = HeaderPod(headers=[("x-pod-name", "meter-7")])
    try:
        options = ObserveOptions(registry=AffinityRegistry(), pod_headers=("x-pod-name",))
        detector = _calls(mode, pod.target, options, count=30)
        snapshot = detector.snapshot()
        assert set(snapshot.pods) == {"meter-7"} and snapshot.unknown_calls == 0, snapshot
        assert snapshot.state is not AffinityState.UNIDENTIFIED
        # Read with the package's own header only, the same pod names no one.
        unread = _calls(mode, pod.target, ObserveOptions(registry=AffinityRegistry()))
        assert unread.snapshot().state is AffinityState.UNIDENTIFIED
    finally:
        pod.stop()


def test_the_header_option_reaches_the_interceptors_sync_and_aio() -> None:
    pod = HeaderPod(headers=[("x-pod-name", "meter-8")])
    options = ObserveOptions(registry=AffinityRegistry(), pod_headers=("x-pod-name",), probe=False)
    try:
        interceptor = AffinityInterceptor(pod.target, options)
        with grpc.insecure_channel(pod.target) as plain:
            channel = grpc.intercept_channel(plain, interceptor)
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
        assert set(interceptor.detector.snapshot().pods) == {"meter-8"}

        async def main() -> AffinityInterceptors:
            interceptors = AffinityInterceptors(
                pod.target, options.but(registry=AffinityRegistry())
            )
            async with grpc.aio.insecure_channel(
                pod.target, interceptors=interceptors.interceptors
            ) as channel:
                assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
                await interceptors.settle()
            return interceptors

        aio_interceptors = asyncio.run(main())
        assert set(aio_interceptors.detector.snapshot().pods) == {"meter-8"}
    finally:
        pod.stop()


@pytest.mark.parametrize(
    "headers", ["x-pod-name", (), ("X-Pod",), ("grpc-pod",), ("pod-bin",), ("a", "a")]
)
def test_a_pod_header_that_cannot_name_a_pod_is_refused(headers: Any) -> None:
    with pytest.raises(ConfigurationError):
        ObserveOptions(pod_headers=headers)


def test_the_warning_is_the_tables_words() -> None:
    voice = VOICES[Cause.UNIDENTIFIED]
    assert voice.state == AffinityState.UNIDENTIFIED.value
    assert "grpc_balance_mw.server" in voice.fix and "pod_headers" in voice.fix


def test_doctor_takes_the_fleet_s_header_names_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["doctor", "127.0.0.1:1", "--pod-header", "x-pod-name", "--pod-header", "x-balance-pod"]
    args = build_parser().parse_args([*argv, "--timeout", "0.1", "--max-seconds", "1", "--json"])
    assert args.pod_header == ["x-pod-name", "x-balance-pod"]
    assert doctor.run(args) == 1  # nothing listens there: port-unreachable, in bounded time
    assert '"code": "port-unreachable"' in capsys.readouterr().out
    with pytest.raises(ConfigurationError):
        doctor.DoctorOptions(pod_headers=("X-Pod",))
