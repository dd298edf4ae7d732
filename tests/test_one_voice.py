"""One cause and one fix per situation, from every voice: the alarm, the pool, the doctor.

Issue 21: under ``sessionAffinity: ClientIP`` the balanced channel blamed the Service while the
detector said "few connections ... allow more lanes", and ``doctor`` said "OK one-pod". Each
situation the local cluster can make is driven here with default options (the probe that
``observe()`` makes by itself), and the detector's cause (snapshot and its one warning), the
balanced channel's stuck reason (where it has one) and the doctor's verdict must all be the same
entry of :data:`~grpc_balance_mw.affinity.advice.VOICES`, in its words.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from fault_load import until
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_prometheus import _states

from grpc_balance_mw.affinity import (
    AffinityDetector,
    AffinityRegistry,
    AffinitySnapshot,
    CallObserver,
)
from grpc_balance_mw.affinity.advice import VOICES, Cause, advice, cause_of_stuck
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.aio.observed_channel import observe as aio_observe
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.cli.doctor import DoctorOptions, Verdict, diagnose, judge
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.telemetry import (
    ATTR_ADVICE,
    ATTR_CAUSE,
    ATTR_STATE,
    EVENT_STATE_CHANGE,
    AffinityTelemetry,
)
from grpc_balance_mw.testing import LocalCluster

Factory = Callable[..., LocalCluster]
MODES = ("sync", "aio")
QUICK = DoctorOptions(samples=16, checks_per_connection=2, timeout_s=1.0, max_seconds=20)

#: Each test starts a cluster of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow


def _alarm(
    mode: str, target: str, caplog: pytest.LogCaptureFixture, calls: int = 60, **options: Any
) -> tuple[AffinitySnapshot, list[str]]:
    """``calls`` back-to-back calls through ``observe(channel)`` with default options (a fresh
    registry aside), the first one alone until the probe's round that it starts has ended;
    the detector's snapshot and the warnings logged meanwhile."""
    chosen = ObserveOptions(registry=AffinityRegistry(), **options)
    caplog.clear()

    def wait_for_round(channel: Any) -> None:
        probe = channel.observer.probe
        assert isinstance(probe, PodProbe), probe
        deadline = time.monotonic() + 10
        while probe.rounds < 1 and time.monotonic() < deadline:
            probe.join(0.1)
        assert probe.rounds >= 1, probe

    if mode == "sync":
        with observe(grpc.insecure_channel(target), chosen, target=target) as channel:
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
            wait_for_round(channel)
            for _ in range(calls - 1):
                assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
            snapshot = channel.detector.snapshot()
    else:

        async def main() -> AffinitySnapshot:
            channel = aio_observe(grpc.aio.insecure_channel(target), chosen, target=target)
            try:
                assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
                await asyncio.to_thread(wait_for_round, channel)
                for _ in range(calls - 1):
                    assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
                return channel.detector.snapshot()
            finally:
                await channel.close()

        snapshot = asyncio.run(main())
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("grpc_balance_mw")
    ]
    return snapshot, warnings


def _said(cause: Cause, warnings: list[str]) -> None:
    """The detector said ``cause`` once, in the table's words."""
    sentence = VOICES[cause].sentence
    assert [w for w in warnings if sentence in w] and len(warnings) == 1, warnings


def _doctor(target: str, **options: Any) -> Verdict:
    return judge(diagnose(target, DoctorOptions(**{**QUICK.__dict__, **options})))


def _doctor_says(verdict: Verdict, cause: Cause) -> None:
    voice = VOICES[cause]
    assert verdict.cause == cause.value, verdict
    assert voice.cause in verdict.summary and verdict.problem is voice.problem, verdict


@pytest.mark.parametrize("mode", MODES)
def test_pinned_one_channel_through_a_clusterip(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None)
    snapshot, warnings = _alarm(mode, cluster.service_target, caplog, calls=50)
    assert snapshot.state.value == "pinned", snapshot  # within 50 calls, default options
    assert snapshot.cause == Cause.SINGLE_CONNECTION.value
    _said(Cause.SINGLE_CONNECTION, warnings)
    _doctor_says(_doctor(cluster.service_target), Cause.SINGLE_CONNECTION)


@pytest.mark.cluster
@pytest.mark.parametrize("mode", MODES)
def test_client_ip_affinity_one_cause_from_alarm_pool_and_doctor(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(
        pods=3, service="iptables", session_affinity="ClientIP", dns=None
    )
    target = cluster.service_target
    # Default options: every fresh connection on one pod, no other known. Not "OK": said so.
    snapshot, warnings = _alarm(mode, target, caplog)
    assert snapshot.cause == Cause.ONE_POD_OR_CLIENT_IP.value, snapshot
    assert snapshot.probe_connections >= 16 and len(snapshot.connection_pods) == 1, snapshot
    _said(Cause.ONE_POD_OR_CLIENT_IP, warnings)
    verdict = _doctor(target)
    _doctor_says(verdict, Cause.ONE_POD_OR_CLIENT_IP)
    assert verdict.code == "one-pod-or-client-ip" and verdict.problem  # not "OK", not exit 0
    # The pods' count known (expected_pods, the Deployment's replicas): ClientIP, by name.
    snapshot, warnings = _alarm(mode, target, caplog, expected_pods=3)
    assert snapshot.cause == Cause.CLIENT_IP.value, snapshot
    _said(Cause.CLIENT_IP, warnings)
    stuck = _stuck(mode, target)
    assert cause_of_stuck(stuck.cause) is Cause.CLIENT_IP
    # The pool's own words (read-only here) carry the table's fix.
    assert VOICES[Cause.CLIENT_IP].fix.split(";")[0] in stuck.message, stuck.message
    _doctor_says(_doctor(target, expected_pods=3), Cause.CLIENT_IP)


def _stuck(mode: str, target: str) -> Any:
    """The balanced channel's stuck reason on ``target``, told the pods' count."""

    async def main() -> Any:
        options = ObserveOptions(expected_pods=3, registry=AffinityRegistry())
        if mode == "sync":
            channel: Any = balanced_channel(target, observe=options)
        else:
            channel = aio_balanced_channel(target, observe=options)
        try:
            assert await until(lambda: channel.stuck is not None, 20), channel
            return channel.stuck
        finally:
            if mode == "sync":
                channel.close()
            else:
                await channel.close()

    return asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_a_one_pod_service_is_one_pod_or_client_ip_too(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What a client sees of one pod is what it sees of ClientIP: the same cause, said so."""
    cluster = local_cluster_factory(pods=1, dns=None)
    snapshot, warnings = _alarm(mode, cluster.service_target, caplog)
    assert snapshot.cause == Cause.ONE_POD_OR_CLIENT_IP.value, snapshot
    _said(Cause.ONE_POD_OR_CLIENT_IP, warnings)
    _doctor_says(_doctor(cluster.service_target), Cause.ONE_POD_OR_CLIENT_IP)


@pytest.mark.parametrize("mode", MODES)
def test_pods_that_stamp_nothing(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None, identity_header=None)
    snapshot, warnings = _alarm(mode, cluster.service_target, caplog, calls=50)
    assert snapshot.state.value == "unidentified" and snapshot.cause == "unidentified"
    _said(Cause.UNIDENTIFIED, warnings)
    _doctor_says(_doctor(cluster.service_target), Cause.UNIDENTIFIED)


def test_pods_that_name_themselves_in_a_header_of_their_own(
    local_cluster_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None, identity_header="x-pod-name")
    target = cluster.service_target
    snapshot, _ = _alarm("sync", target, caplog, calls=50, pod_headers=("x-pod-name",))
    assert snapshot.state.value == "pinned" and len(snapshot.known_pods) >= 2, snapshot
    _doctor_says(_doctor(target, pod_headers=("x-pod-name",)), Cause.SINGLE_CONNECTION)
    _doctor_says(_doctor(target), Cause.UNIDENTIFIED)


@pytest.mark.cluster
@pytest.mark.parametrize("mode", MODES)
def test_an_l7_proxy_balancing_each_call(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None, l7="haproxy")
    snapshot, warnings = _alarm(mode, cluster.l7_target, caplog)
    assert snapshot.state.value == "l7-balanced" and snapshot.cause == "per_request", snapshot
    assert warnings == []  # nothing to fix: nothing said at warning level
    _doctor_says(_doctor(cluster.l7_target), Cause.PER_REQUEST)


def test_pods_leaving_are_said_in_the_tables_words_on_spans_and_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = AffinityTelemetry(tracer_provider=provider, metrics=False)
    detector = AffinityDetector("charge-points.ev.svc:80")
    observer = CallObserver(detector, telemetry=telemetry)
    caplog.set_level(logging.INFO, logger="grpc_balance_mw.telemetry")
    detector.add_known_pods(["pod-a", "pod-b"], fresh=False)
    detector.forget_pods(["pod-b"])  # a headless answer without it: it left
    observer.begin("/svc.S/M", "unary_unary").finish([("x-balance-pod", "pod-a")], None, 0)
    provider.shutdown()
    (span,) = exporter.get_finished_spans()
    (gone,) = [e for e in span.events if e.name.endswith("pod_gone")]
    assert (gone.attributes or {})[ATTR_CAUSE] == Cause.PODS_LEAVING.value
    assert any(VOICES[Cause.PODS_LEAVING].sentence in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mode", MODES)
def test_skewed_calls_say_one_cause_in_the_alarm_span_event_and_state_metric(
    local_cluster_factory: Factory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Channels to one target whose calls go 80/10/10 over its 3 pods: ``skewed``, with the
    table's cause for a few connections crowding one pod, in the detector's one warning, the
    snapshot, the span event of the state change and the state gauge. (``doctor`` judges a
    Service's fresh connections, which kube-proxy spreads at random: it has no skewed verdict.)"""
    cluster = local_cluster_factory(pods=3, dns=None)
    target = cluster.service_target
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider, meter_provider = TracerProvider(), MeterProvider(metric_readers=[metrics])
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = AffinityTelemetry(tracer_provider=tracer_provider, meter_provider=meter_provider)
    options = ObserveOptions(registry=AffinityRegistry(), probe=False, telemetry=telemetry)
    # Each channel dials one pod (the test plays the Service), observed as the target's: 80 %
    # of the connections and calls on one pod of 3 (over the skew line, 2/3, under the pinned
    # one, 0.95); 24 of 30 connections on one pod happen by chance with p = 6e-7, below
    # ``chance_alpha`` (1e-4).
    crowded, other, third = (e.address for e in sorted(cluster.endpoints()))
    dialled = [*[crowded] * 8, other, third] * 3
    caplog.clear()

    async def main() -> tuple[AffinitySnapshot, dict[str, Any]]:
        if mode == "sync":
            channels: list[Any] = [
                observe(grpc.insecure_channel(a), options, target=target) for a in dialled
            ]
        else:
            channels = [
                aio_observe(grpc.aio.insecure_channel(a), options, target=target) for a in dialled
            ]
        try:
            for _ in range(7):  # 210 calls: the window's 200 are all in the same proportions
                for channel in channels:
                    if mode == "sync":
                        seen = await asyncio.to_thread(call_sync, channel, "unary_unary")
                    else:
                        seen = await call_aio(channel, "unary_unary")
                    assert seen.code is grpc.StatusCode.OK
            states = _states(metrics)  # while the target's channels are open
            return channels[0].detector.snapshot(), {
                state: value for (of, state), value in states.items() if of == target
            }
        finally:
            for channel in channels:
                if mode == "sync":
                    channel.close()
                else:
                    await channel.close()

    snapshot, states = asyncio.run(main())
    tracer_provider.shutdown()
    cause = Cause.FEW_CONNECTIONS
    assert snapshot.state.value == "skewed" == VOICES[cause].state, snapshot
    assert snapshot.cause == cause.value and snapshot.advice == advice(cause), snapshot
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("grpc_balance_mw")
    ]
    _said(cause, warnings)
    changes = [
        e.attributes or {}
        for span in spans.get_finished_spans()
        for e in span.events
        if e.name == EVENT_STATE_CHANGE
    ]
    assert changes and changes[-1][ATTR_STATE] == "skewed", changes
    assert (changes[-1][ATTR_CAUSE], changes[-1][ATTR_ADVICE]) == (cause.value, advice(cause))
    assert states["skewed"] == 1 and sum(states.values()) == 1, states
    meter_provider.shutdown()
