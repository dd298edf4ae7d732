"""After a scale-down (4 -> 3 pods) the affinity detector stops counting the pod that left, on
evidence and within seconds, sync and aio, graceful and SIGKILL.

Before, the detector kept every pod it had seen for ``known_pods_ttl_s`` (600 s): after a
scale-down its alarm judged against a pod that no longer existed for ten minutes. Now it judges
from the target's membership model (``AffinityDetector.membership``): a balanced channel's pool
shares that model (its lanes' checks and scouts are the evidence), and an observed plain channel
feeds it its calls, its probe's rounds (fresh connections that keep missing a pod) and calls that
fail UNAVAILABLE. Real pods on loopback behind the userspace L4 Service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from test_scale_down import calls

from grpc_balance_mw._membership import Source
from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityRegistry,
    AffinitySnapshot,
)
from grpc_balance_mw.affinity.lanes import LaneEvidence
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.aio.observed_channel import observe as aio_observe
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.testing import LocalCluster

Factory = Callable[..., LocalCluster]
PODS = {f"charge-points-{i}" for i in range(4)}
#: The pod ``scale(3)`` removes (the newest), and the one killed in the SIGKILL case.
LEAVING = "charge-points-3"
#: Well under the 600 s the detector used to remember a pod that left; it takes a few seconds.
BOUND_S = 30.0


async def _until(condition: Callable[[], bool], mode: str, channel: Any, timeout_s: float) -> bool:
    """Wait, with calls going on as an application's would, until ``condition``, at most
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await calls(mode, channel, 10)
    return True


async def _scale_down(
    cluster: LocalCluster, how: str, mode: str, channel: Any, detector: AffinityDetector
) -> None:
    """Once the detector counts the 4 pods, take ``LEAVING`` out of the Service and stop it
    (gracefully, or SIGKILL), calls going on; then wait, bounded, until the detector counts the
    3 pods left."""
    assert await _until(lambda: _counts(detector.snapshot(), PODS), mode, channel, BOUND_S), (
        detector.snapshot()
    )
    if how == "graceful":
        event = asyncio.create_task(asyncio.to_thread(cluster.scale, 3))
    else:
        event = asyncio.create_task(asyncio.to_thread(cluster.kill, LEAVING))
    while not event.done():
        await calls(mode, channel, 5)
    await event
    assert await _until(
        lambda: _counts(detector.snapshot(), PODS - {LEAVING}), mode, channel, BOUND_S
    ), detector.snapshot()


def _counts(snapshot: AffinitySnapshot, pods: set[str]) -> bool:
    return set(snapshot.known_pods) == pods and snapshot.known_count == len(pods)


async def _close(mode: str, channel: Any) -> None:
    if mode == "sync":
        channel.close()
    else:
        await channel.close()


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_the_detector_of_a_balanced_channel_drops_the_pod_that_left(
    local_cluster_factory: Factory, mode: str, how: str
) -> None:
    """The pool's evidence (a lane's pod gone, scouts that miss it) is the detector's: its
    snapshot counts the 3 pods left and the evenly spread channel is ``balanced`` over them."""
    cluster = local_cluster_factory(pods=4, dns=None)
    options = ObserveOptions(registry=AffinityRegistry(), probe=False)

    async def main() -> None:
        target = cluster.service_target
        if mode == "sync":
            channel: Any = balanced_channel(target, observe=options)
        else:
            channel = aio_balanced_channel(target, observe=options)
        detector = channel.detector
        try:
            await _scale_down(cluster, how, mode, channel, detector)
            assert await _until(
                lambda: detector.state.value == "balanced", mode, channel, BOUND_S
            ), detector.snapshot()
            snapshot = detector.snapshot()
            assert _counts(snapshot, PODS - {LEAVING}) and snapshot.state.value == "balanced", (
                snapshot
            )
            gone = [e for e in detector.take_pod_events() if e.kind == "pod_gone"]
            assert [e.pod for e in gone] == [LEAVING], gone
            assert detector.membership is channel.pool.membership  # one model per target
        finally:
            await _close(mode, channel)

    asyncio.run(main())


@pytest.mark.cluster
@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_the_detector_of_an_observed_channel_drops_the_pod_that_left(
    local_cluster_factory: Factory, mode: str, how: str
) -> None:
    """A plain channel, observed: its probe's fresh connections found the 4 pods; after the
    scale-down they keep missing the one that left (or its calls fail UNAVAILABLE, if the
    channel was on it), and it leaves the detector's count."""
    cluster = local_cluster_factory(pods=4, dns=None)
    target = cluster.service_target
    registry = AffinityRegistry()
    detector = registry.detector(target)
    # A round a second, so that the test waits seconds: the default schedule (one round per
    # 5 minutes) is the same evidence, later.
    probe = PodProbe(target, detector, interval_s=1.0, connections=24)
    options = ObserveOptions(registry=registry, probe=probe)

    async def main() -> None:
        if mode == "sync":
            channel: Any = observe(grpc.insecure_channel(target), options, target=target)
        else:
            channel = aio_observe(grpc.aio.insecure_channel(target), options, target=target)
        try:
            await _scale_down(cluster, how, mode, channel, detector)
            assert LEAVING not in detector.membership.live()
        finally:
            probe.stop()
            await _close(mode, channel)
            probe.join(5)

    asyncio.run(main())


# The pure core: the detector follows its membership model (fake clock, no sockets).


def test_probe_rounds_that_keep_missing_a_pod_take_it_out_of_the_detectors_count() -> None:
    detector = AffinityDetector("svc:1")
    detector.add_known_pods(["a", "b", "c", "d"], now=0.0)
    # 4 pods known: 25 fresh connections in a row must miss "d" (p = 0.75**25 < 1e-3).
    detector.add_known_pods(["a", "b", "c"] * 8, now=1.0)
    assert detector.snapshot(now=1.0).known_count == 4  # 24 misses: not yet
    detector.add_known_pods(["a"], now=2.0)
    snapshot = detector.snapshot(now=2.0)
    assert snapshot.known_pods == ("a", "b", "c") and snapshot.known_count == 3, snapshot
    events = [(e.kind, e.pod, e.source) for e in detector.take_pod_events()]
    assert events[-1] == ("pod_gone", "d", "probe"), events


def test_calls_failing_unavailable_on_a_pods_connection_are_gone_evidence() -> None:
    detector = AffinityDetector("svc:1")
    lane, other = LaneEvidence("lane"), LaneEvidence("other")
    detector.record("a", lane=lane, now=0.0)
    detector.record("b", lane=other, now=0.0)
    detector.unavailable(lane, now=1.0)
    assert detector.snapshot(now=1.0).known_pods == ("b",)
    detector.record("a", lane=lane, now=2.0)  # it answers again: it counts again
    assert detector.snapshot(now=2.0).known_pods == ("a", "b")


def test_what_a_pool_sharing_the_model_finds_is_the_detectors_count() -> None:
    detector = AffinityDetector("svc:1")
    pool_side = detector.membership  # what LanePool.share_membership keeps
    for pod in "abcd":
        pool_side.confirmed(pod, Source.CHECK, 0.0)
    assert detector.snapshot(now=0.0).known_count == 4
    pool_side.gone("d", "not serving", 1.0)  # a lane's health check
    snapshot = detector.snapshot(now=1.0)
    assert snapshot.known_pods == ("a", "b", "c"), snapshot
    assert ("pod_gone", "d", "evidence") in [
        (e.kind, e.pod, e.source) for e in detector.take_pod_events()
    ]


def test_known_pods_ttl_s_is_an_upper_bound_on_an_unconfirmed_pod() -> None:
    detector = AffinityDetector("svc:1", AffinityConfig(known_pods_ttl_s=100))
    detector.add_known_pods(["a", "b"], now=0.0)
    detector.membership.confirmed("b", Source.CHECK, 90.0)  # a pool's check, since
    detector.record("a", now=150.0)
    assert detector.snapshot(now=150.0).known_pods == ("a", "b")
    detector.record("a", now=250.0)
    assert detector.snapshot(now=250.0).known_pods == ("a",)


def test_pods_found_gone_are_not_remembered_for_ever_without_a_pool() -> None:
    detector = AffinityDetector("svc:1")
    detector.add_known_pods(["a", "b"], now=0.0)
    detector.forget_pods(["b"], now=1.0)  # a DNS answer without it
    assert detector.membership.down() == {"b"}
    detector.record("a", now=100.0)  # pruning runs with the calls
    assert detector.membership.down() == frozenset() and not detector.membership.knows("b")


def test_a_stale_expected_pods_yields_to_fresh_connections_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """expected_pods=4 after a scale-down to 3: probe rounds keep finding 3 pods; after the
    model's patience (10 s) the detector counts 3 and says why once."""
    detector = AffinityDetector("svc:1", AffinityConfig(expected_pods=4))
    for second in range(12):
        detector.add_known_pods(["a", "b", "c"] * 10, now=float(second))
        detector.record("a", now=float(second) + 0.5)
    (said,) = [r.getMessage() for r in caplog.records if "expected_pods=4" in r.getMessage()]
    assert "probably scaled" in said, said
    assert detector.snapshot(now=12.0).known_count == 3
    detector.expected_pods = 4  # a new channel with the same options: the verdict stays
    assert detector.snapshot(now=12.0).known_count == 3
