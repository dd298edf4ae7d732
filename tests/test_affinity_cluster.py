"""Affinity detection against the local cluster: pinned through an L4 Service, quiet when balanced.

The "done when" of the detector: one channel through the L4 Service to 3 pods raises the pinned
alarm within a bounded number of calls (with a known pod count, or with the probe), sync and aio,
unary and streaming; headless + round_robin and the L7 proxy raise no alarm over a long run; a pod
killed mid-run is handled without errors in the interceptor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from affinity_fixtures import MODES, NO_WARMUP, SYNC_WRAPPERS, observe_sync
from calls import CALL_KINDS, call_aio, call_sync
from conftest import require

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityRegistry,
    AffinityState,
    Transition,
)
from grpc_balance_mw.aio import interceptors as aio_client
from grpc_balance_mw.interceptors import AffinityInterceptor
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import LocalCluster, missing_components

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.leaks_per_module(
        reason="the module's cluster opens its pods' admin connections when first asked"
    ),
]

DEFAULTS = AffinityConfig()
#: With the pod count known, the alarm comes after exactly this many calls on one pod.
PINNED_AFTER = DEFAULTS.min_samples + DEFAULTS.dwell_calls - 1
ROUND_ROBIN = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
]
LONG_RUN = 1500


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace", "embedded", "haproxy")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns="embedded", l7="haproxy") as running:
        yield running


Stop = Callable[[AffinityDetector], bool]


def _pinned(detector: AffinityDetector) -> bool:
    return detector.state is AffinityState.PINNED


async def drive(
    mode: str,
    target: str,
    kind: str,
    calls: int,
    stop: Stop | None = None,
    options: list[tuple[str, Any]] | None = None,
    **interceptor_kwargs: Any,
) -> tuple[int, AffinityDetector, list[grpc.StatusCode]]:
    """Make up to ``calls`` calls on one channel observed the ``mode`` way (see MODES); stop
    early once ``stop(detector)`` holds.

    Returns how many calls were made, the detector and every call's status code.
    """
    codes: list[grpc.StatusCode] = []
    if mode != "aio":

        def run() -> tuple[int, AffinityDetector, list[grpc.StatusCode]]:
            with grpc.insecure_channel(target, options=options) as channel:
                observed, watcher = observe_sync(channel, target, mode, **interceptor_kwargs)
                for _ in range(calls):
                    codes.append(call_sync(observed, kind).code)
                    if stop is not None and stop(watcher.detector):
                        break
            return len(codes), watcher.detector, codes

        return await asyncio.to_thread(run)
    interceptor = aio_client.AffinityInterceptors(target, ObserveOptions(**interceptor_kwargs))
    async with grpc.aio.insecure_channel(
        target, options=options, interceptors=interceptor.interceptors
    ) as channel:
        for _ in range(calls):
            codes.append((await call_aio(channel, kind)).code)
            await interceptor.settle()
            if stop is not None and stop(interceptor.detector):
                break
    return len(codes), interceptor.detector, codes


@pytest.mark.parametrize("kind", CALL_KINDS)
@pytest.mark.parametrize("mode", MODES)
async def test_l4_service_with_known_pod_count_is_pinned(
    cluster: LocalCluster, mode: str, kind: str
) -> None:
    made, detector, codes = await drive(
        mode,
        cluster.service_target,
        kind,
        calls=5 * PINNED_AFTER,
        stop=_pinned,
        registry=AffinityRegistry(NO_WARMUP),
        expected_pods=3,
    )
    assert set(codes) == {grpc.StatusCode.OK}
    assert detector.state is AffinityState.PINNED and made == PINNED_AFTER
    snapshot = detector.snapshot()
    assert snapshot.top_share == 1.0 and len(snapshot.pods) == 1


@pytest.mark.parametrize("kind", ["unary_unary", "stream_stream"])
@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_l4_service_with_the_probe_is_pinned(
    cluster: LocalCluster, mode: str, kind: str
) -> None:
    registry = AffinityRegistry(NO_WARMUP)
    target = cluster.service_target
    probe = PodProbe(target, registry.detector(target), interval_s=0.02, connections=3)
    made, detector, codes = await drive(
        mode, target, kind, calls=2000, stop=_pinned, registry=registry, probe=probe
    )
    probe.join(5)
    assert set(codes) == {grpc.StatusCode.OK}
    snapshot = detector.snapshot()
    assert detector.state is AffinityState.PINNED, snapshot
    print(f"{mode} {kind}: pinned after {made} calls, {probe.rounds} probe rounds, {snapshot}")
    assert set(snapshot.known_pods) <= {pod.name for pod in cluster.pods}
    assert len(snapshot.known_pods) >= 2 and len(snapshot.pods) == 1


@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_the_pinned_pod_is_the_one_that_served_and_the_alarm_says_so(
    cluster: LocalCluster, wrapper: str
) -> None:
    cluster.reset_counts()
    alarms = AlarmLog()
    with grpc.insecure_channel(cluster.service_target) as channel:
        observed, watcher = observe_sync(
            channel,
            cluster.service_target,
            wrapper,
            registry=AffinityRegistry(NO_WARMUP),
            expected_pods=3,
            telemetry=AffinityTelemetry(spans=False, metrics=False, on_alarm=alarms),
        )
        for _ in range(60):
            call_sync(observed, "unary_unary")
    served = {pod: count for pod, count in cluster.served().items() if count}
    snapshot = watcher.detector.snapshot()
    assert served == {snapshot.top_pod: 60}
    assert snapshot.state is AffinityState.PINNED
    (alarm,) = alarms.transitions
    assert alarm.current is AffinityState.PINNED and alarm.snapshot.top_pod == snapshot.top_pod


class AlarmLog:
    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def __call__(self, transition: Transition) -> None:
        self.transitions.append(transition)

    @property
    def false_alarms(self) -> int:
        return sum(t.current.is_alarm for t in self.transitions)


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("route", ["headless", "l7"])
async def test_balanced_routes_raise_no_alarm_over_a_long_run(
    cluster: LocalCluster, mode: str, route: str
) -> None:
    target = cluster.headless_target if route == "headless" else cluster.l7_target
    options = ROUND_ROBIN if route == "headless" else None
    alarms = AlarmLog()
    registry = AffinityRegistry()  # the defaults, warm-up included: a fresh channel's start
    probe = PodProbe(target, registry.detector(target), interval_s=0.05, connections=2)
    states: list[AffinityState] = []

    def keep_state(detector: AffinityDetector) -> bool:
        states.append(detector.state)
        return len(states) - detector.snapshot().warmup_calls >= LONG_RUN  # judged calls

    made, detector, codes = await drive(
        mode,
        target,
        "unary_unary",
        calls=4 * LONG_RUN,  # a bound: warm-up (1 s) plus LONG_RUN judged calls end it first
        stop=keep_state,
        options=options,
        registry=registry,
        expected_pods=3,
        probe=probe,
        telemetry=AffinityTelemetry(spans=False, metrics=False, on_alarm=alarms),
    )
    probe.join(5)
    snapshot = detector.snapshot()
    print(f"{route} {mode}: {made} calls, false alarms {alarms.false_alarms}, {snapshot}")
    assert set(codes) == {grpc.StatusCode.OK}
    assert made - snapshot.warmup_calls >= LONG_RUN
    assert alarms.false_alarms == 0 and not any(state.is_alarm for state in states)
    # Pods switch between calls on the proxy's one address: balanced per request, in front.
    balanced = AffinityState.BALANCED if route == "headless" else AffinityState.L7_BALANCED
    assert detector.state is balanced
    assert len(snapshot.pods) == 3 and snapshot.top_share < 0.5


def test_a_pod_killed_mid_run_is_handled() -> None:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    alarms = AlarmLog()
    with LocalCluster(pods=3, service="userspace", dns=None) as cluster:
        interceptor = AffinityInterceptor(
            cluster.service_target,
            ObserveOptions(
                registry=AffinityRegistry(NO_WARMUP),
                expected_pods=3,
                telemetry=AffinityTelemetry(spans=False, metrics=False, on_alarm=alarms),
            ),
        )
        codes: list[grpc.StatusCode] = []
        with grpc.insecure_channel(cluster.service_target) as channel:
            intercepted = grpc.intercept_channel(channel, interceptor)
            for _ in range(40):
                codes.append(call_sync(intercepted, "unary_unary").code)
            first = interceptor.detector.snapshot().top_pod
            assert first is not None
            cluster.kill(first)
            deadline = time.monotonic() + 20
            for _ in range(2000):  # bounded in count and in time
                codes.append(call_sync(intercepted, "unary_unary", timeout=2).code)
                if set(interceptor.detector.snapshot().pods) - {first}:
                    break
                if time.monotonic() > deadline:
                    break
                if codes[-1] is not grpc.StatusCode.OK:
                    time.sleep(0.01)
    snapshot = interceptor.detector.snapshot()
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert set(snapshot.pods) - {first}, snapshot
    failed = sum(code is not grpc.StatusCode.OK for code in codes)
    assert snapshot.unknown_calls == failed
    assert [t.current for t in alarms.transitions][:1] == [AffinityState.PINNED]


def _pod_of(seen: Any) -> str:
    return str(seen.initial["x-balance-pod"])


@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_one_interceptor_on_several_channels_keeps_a_lane_per_channel(
    cluster: LocalCluster, mode: str
) -> None:
    """One interceptor passed to three channels, each pinned to its own pod through the L4
    Service, calls interleaved: three connections that never switch pods, spread over the
    pods (balanced), not one lane switching pods at every call (per-request balancing)."""
    target, alarms = cluster.service_target, AlarmLog()
    options = ObserveOptions(
        registry=AffinityRegistry(NO_WARMUP),
        expected_pods=3,
        telemetry=AffinityTelemetry(spans=False, metrics=False, on_alarm=alarms),
    )
    fresh = [("grpc.use_local_subchannel_pool", 1)]
    on_pod: dict[str, Any] = {}  # one channel per pod; fresh channels land at random
    # Bounded: 40 fresh connections all miss one of 3 pods with a chance of 3e-7.
    if mode == "sync":
        interceptor = AffinityInterceptor(target, options)

        def run() -> AffinityDetector:
            channels = []
            try:
                while len(on_pod) < 3 and len(channels) < 40:
                    channels.append(grpc.insecure_channel(target, options=fresh))
                    observed = grpc.intercept_channel(channels[-1], interceptor)
                    on_pod.setdefault(_pod_of(call_sync(observed, "unary_unary")), observed)
                for _ in range(60):
                    for observed in on_pod.values():
                        assert call_sync(observed, "unary_unary").code is grpc.StatusCode.OK
            finally:
                for channel in channels:
                    channel.close()
            return interceptor.detector

        detector = await asyncio.to_thread(run)
    else:
        interceptors = aio_client.AffinityInterceptors(target, options)
        channels = []
        try:
            while len(on_pod) < 3 and len(channels) < 40:
                channels.append(
                    grpc.aio.insecure_channel(
                        target, options=fresh, interceptors=interceptors.interceptors
                    )
                )
                on_pod.setdefault(
                    _pod_of(await call_aio(channels[-1], "unary_unary")), channels[-1]
                )
            for _ in range(60):
                for channel in on_pod.values():
                    assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
            await interceptors.settle()
        finally:
            for channel in channels:
                await channel.close()
        detector = interceptors.detector
    snapshot = detector.snapshot()
    assert len(on_pod) == 3, snapshot
    assert snapshot.per_request_lanes == 0 and snapshot.lanes >= 3, snapshot
    assert detector.state is AffinityState.BALANCED and alarms.false_alarms == 0, snapshot


@pytest.mark.parametrize("kind", CALL_KINDS)
@pytest.mark.parametrize("mode", ["sync", "aio"])
async def test_an_interceptor_finds_the_channel_of_every_call_kind(
    cluster: LocalCluster, mode: str, kind: str
) -> None:
    """Two channels, one interceptor: two lanes, whatever the call kind. Sync, the first channel
    is also intercepted twice over (and under another interceptor): still its one lane."""
    target = cluster.service_target
    options = ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
    if mode == "sync":
        interceptor = AffinityInterceptor(target, options)
        other = AffinityInterceptor(target, ObserveOptions(registry=AffinityRegistry()))
        with grpc.insecure_channel(target) as first, grpc.insecure_channel(target) as second:
            wrapped = [
                grpc.intercept_channel(first, interceptor),
                grpc.intercept_channel(grpc.intercept_channel(first, interceptor), other),
                grpc.intercept_channel(grpc.intercept_channel(first, other), interceptor),
                grpc.intercept_channel(second, interceptor),
            ]
            for channel in wrapped:
                assert (
                    await asyncio.to_thread(call_sync, channel, kind)
                ).code is grpc.StatusCode.OK
        lanes, detector = interceptor.observer.channel_lanes, interceptor.detector
    else:
        interceptors = aio_client.AffinityInterceptors(target, options)
        for _ in range(2):
            async with grpc.aio.insecure_channel(
                target, interceptors=interceptors.interceptors
            ) as channel:
                assert (await call_aio(channel, kind)).code is grpc.StatusCode.OK
                await interceptors.settle()
        lanes, detector = interceptors.observer.channel_lanes, interceptors.detector
    assert detector.snapshot().lanes == 2  # (judges the calls queued by detection only)
    assert lanes is not None and lanes.first.calls == (3 if mode == "sync" else 1)
    assert len(lanes) == 2 or mode == "sync"  # a collected sync channel forgets its lane
