"""``observe(channel, rebalance=Rebalance(factory))``, sync and aio: a channel the user cannot
change how it is made, pinned behind an L4 Service, moves its calls onto lanes when the alarm
comes (or at once), through the stubs made before the move, for every call kind; with
``retry=`` a SIGKILLed pod costs no retryable call; ``close()`` closes the lanes it opened.

Every claim about where calls went is the pods' own count (``cluster.served()``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from calls import CALL_KINDS
from conftest import require
from fault_load import (
    GET,
    MODES,
    OK,
    close_channel,
    count_calls,
    covered,
    load,
    retry_policy,
    threads_left,
    threads_now,
    until,
)

from grpc_balance_mw import ObserveOptions, Rebalance, balanced_channel, channel_factory, observe
from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw.affinity import AffinityConfig, AffinityDetector, AffinityRegistry
from grpc_balance_mw.affinity.advice import Cause, advice
from grpc_balance_mw.affinity.lanes import LaneEvidence
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool import rotate_when_pod_gone
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

ON_LANES = advice(Cause.SINGLE_CONNECTION, on_lanes=True)
REQUEST = pb.GetChargePointRequest(id="cp-1")
#: Lanes replaced only when their pod goes: the lanes' call counts then add up in a test.
STEADY = rotate_when_pod_gone()


@pytest.fixture(scope="module")
def shared() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        running.reset_counts()  # the admin connections now: the module's, not the first test's
        yield running


@pytest.fixture
def cluster(shared: LocalCluster) -> Iterator[LocalCluster]:
    """The shared cluster, every pod running again (and quick) after each test."""
    yield shared
    for pod in list(shared.pods):
        if not pod.alive:
            shared.restart(pod.name)
        else:
            shared.configure(pod.name, service_time_ms=0)
    shared.reset_counts()  # a restarted pod's admin connection now, with its test's leaves


def options() -> ObserveOptions:
    """Three pods expected, a registry (so a detector) of the test's own, no warm-up."""
    # No probe: these tests are about moving calls; test_default_probe.py covers the probe.
    return ObserveOptions(
        expected_pods=3, registry=AffinityRegistry(AffinityConfig(warmup_s=0)), probe=False
    )


def factory(mode: str, target: str) -> Callable[..., Any]:
    return channel_factory(target) if mode == "sync" else balance_aio.channel_factory(target)


def observed(
    mode: str, target: str, rebalance: Rebalance, observing: ObserveOptions | None = None
) -> Any:
    """A plain channel to ``target``, observed with ``rebalance`` (aio: inside the loop)."""
    observing = observing if observing is not None else options()
    if mode == "sync":
        return observe(grpc.insecure_channel(target), observing, rebalance=rebalance)
    channel = grpc.aio.insecure_channel(target)
    # target= given: an old grpcio's aio channel (the floor) keeps no target to learn.
    return balance_aio.observe(channel, observing, rebalance=rebalance, target=target)


class Stub:
    """One stub, made once and kept (as users do), called the same way in both modes."""

    def __init__(self, mode: str, channel: Any) -> None:
        self.mode = mode
        self.stub = pb_grpc.ChargePointsStub(channel)

    async def get(self, count: int = 1) -> set[grpc.StatusCode]:
        codes = set()
        for _ in range(count):
            if self.mode == "sync":
                _response, call = self.stub.GetChargePoint.with_call(REQUEST, timeout=5)
                codes.add(call.code())
            else:
                call = self.stub.GetChargePoint(REQUEST, timeout=5)
                await call
                codes.add(await call.code())
        return codes

    async def each_kind(self) -> None:
        """One call of every kind through this stub's methods; each must be OK."""
        stub, sync = self.stub, self.mode == "sync"
        watch = pb.WatchStatusRequest(id="cp-1", updates=2, interval_ms=1)
        meters = [pb.MeterValue(energy_wh=1.0)]
        session = [pb.SessionMessage(command="start")]
        if sync:
            assert stub.GetChargePoint(REQUEST, timeout=5).id == "cp-1"
            assert len(list(stub.WatchStatus(watch, timeout=5))) == 2
            assert stub.UploadMeterValues(iter(meters), timeout=5) is not None
            assert len(list(stub.Session(iter(session), timeout=5))) >= 1
            return
        assert (await stub.GetChargePoint(REQUEST, timeout=5)).id == "cp-1"
        assert len([r async for r in stub.WatchStatus(watch, timeout=5)]) == 2
        assert await stub.UploadMeterValues(iter(meters), timeout=5) is not None
        assert len([r async for r in stub.Session(iter(session), timeout=5)]) >= 1


def lane_calls(balanced: Any) -> int:
    return sum(lane.calls for lane in balanced.pool.lanes)


@pytest.mark.parametrize("when", ["alarm", "always"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_a_pinned_channel_moves_its_calls_onto_lanes_through_stubs_made_before(
    cluster: LocalCluster, mode: str, when: str
) -> None:
    rebalance = Rebalance(
        factory(mode, cluster.service_target),
        when=when,  # type: ignore[arg-type]
        rotation=STEADY,
        check_interval_s=0.02,
    )

    async def main() -> None:
        channel = observed(mode, cluster.service_target, rebalance)
        stub = Stub(mode, channel)  # made before any move, used after it
        rebalancer = channel.rebalancer
        try:
            cluster.reset_counts()
            if when == "alarm":
                assert rebalancer.balanced is None
                for _ in range(2000):  # bounded: the alarm comes within the first few dozen
                    assert await stub.get() == {OK}
                    if rebalancer.balanced is not None:
                        break
                before = cluster.served()
                assert sorted(before.values()).count(0) == 2, before  # it really was pinned
                # The alarm still holds (its window is the pinned calls'), and the advice now
                # fits a client that is already on lanes.
                snapshot = channel.detector.snapshot()
                assert snapshot.state.is_alarm, snapshot
                assert snapshot.advice == ON_LANES, snapshot.advice
            balanced = rebalancer.balanced
            assert balanced is not None and "on lanes" in repr(rebalancer)
            assert await until(lambda: len(covered(balanced)) == 3, 15), balanced
            cluster.reset_counts()
            assert await stub.get(90) == {OK}
            spread = cluster.served()
            calls = lane_calls(balanced)
            await stub.each_kind()  # every kind follows, through the stub made before
            assert lane_calls(balanced) == calls + len(CALL_KINDS)
        finally:
            await close_channel(mode, channel)
        assert all(spread[pod.name] > 0 for pod in cluster.pods), spread
        assert max(spread.values()) < 0.6 * sum(spread.values()), spread

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.leaves(
    processes=("charge_points.pod",),
    sockets=True,  # the admin connection to it
    reason="the module's cluster restarts the pod this test kills: the pod is the module's",
)
@pytest.mark.parametrize("mode", MODES)
def test_retry_through_the_move_survives_a_sigkilled_pod(cluster: LocalCluster, mode: str) -> None:
    """``Rebalance(retry=)`` reaches the balanced channel: a rebalanced client keeps its
    retryable calls alive across a SIGKILLed pod, as ``balanced_channel(retry=)`` does.
    (Response streams through the same retry: tests/test_faults.py.)"""
    victim = cluster.pods[0].name
    policy = retry_policy(True, backoff_s=0.5)  # see tests/test_faults.py for why 0.5 s
    rebalance = Rebalance(factory(mode, cluster.service_target), when="always", retry=policy)
    hit: list[int] = []  # calls in flight on the victim's lane when it was killed

    async def main() -> list[Any]:
        channel = observed(mode, cluster.service_target, rebalance)
        try:
            balanced = channel.rebalancer.balanced
            assert balanced is not None and balanced.retry is policy
            assert await until(lambda: len(covered(balanced)) == 3, 15), balanced

            def kill() -> None:
                hit.append(
                    sum(lane.in_flight for lane in balanced.pool.lanes if lane.pod == victim)
                )
                cluster.kill(victim)

            # Calls last long enough that the kill finds some in flight on the victim (and
            # that an aio call counted there has not in fact ended, its callback still queued).
            for pod in cluster.pods:
                cluster.configure(pod.name, service_time_ms=300 if pod.name == victim else 20)
            cluster.reset_counts()
            return await load(mode, channel, "unary_unary", 120, 8, fault_at=24, fault=kill)
        finally:
            await close_channel(mode, channel)

    outcomes = asyncio.run(main())
    codes = [o.code for o in outcomes]
    assert codes == [OK] * 120, codes  # not one retryable call lost
    assert policy.budget is not None
    _calls, retries = policy.budget.counts()
    assert retries >= 1 or hit == [0], hit  # the calls the kill cut were sent again
    assert sum(cluster.served().values()) <= codes.count(OK) + retries


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _ours(thread: threading.Thread) -> bool:
    return thread.name.startswith(("rebalance ", "balanced-channel "))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
def test_close_closes_the_lanes_it_opened_and_leaks_nothing(
    cluster: LocalCluster, mode: str
) -> None:
    target = cluster.service_target

    async def once(when: str, calls: int) -> Any:
        """One rebalanced channel, ``calls`` calls, closed; the balanced channel it opened."""
        channel = observed(mode, target, Rebalance(factory(mode, target), when=when))  # type: ignore[arg-type]
        await Stub(mode, channel).get(calls)
        balanced = channel.rebalancer.balanced
        await close_channel(mode, channel)
        assert "closed" in repr(channel.rebalancer) and channel.rebalancer.balanced is None
        return balanced

    async def main() -> None:
        await once("always", 5)  # warm grpc up: its own threads and fds stay
        threads, fds = threads_now(), _fds()
        for _ in range(6):
            for when, calls in (("always", 20), ("alarm", 5)):
                balanced = await once(when, calls)
                if balanced is not None:  # its lanes are closed: nothing takes a call
                    assert balanced.pool.closed and not balanced.pool.lanes, balanced
        if mode == "aio":
            left = asyncio.all_tasks() - {asyncio.current_task()}
            assert not left, left
        assert not [t for t in threading.enumerate() if _ours(t)]
        assert not threads_left(threads)
        # gRPC core closes a closed channel's sockets on its own threads, a moment after
        # close(). A leak stays; a delayed close is given 5 s to happen. (Until the package's
        # done-callbacks left no cycle, and grpcio 1.53 became the floor, aio lanes' sockets
        # stayed open until the garbage collector ran, or for good on grpcio 1.50.)
        for _ in range(50):
            if _fds() <= fds + 4:
                break
            gc.collect()
            await asyncio.sleep(0.1)
        assert _fds() <= fds + 4, (fds, _fds())

    asyncio.run(main())


def test_after_a_move_the_advice_fits_a_client_already_on_lanes() -> None:
    """The pinned channel's history stays in the shared detector for a while after the move:
    its alarm must not tell the user to use the balanced channel they are on."""
    detector = AffinityDetector("10.96.0.10:80")
    detector.expected_pods = 3
    now = 1000.0
    pinned = LaneEvidence()
    for _ in range(100):
        now += 0.001
        detector.record("a", now=now, lane=pinned)
    before = detector.snapshot(now=now)
    assert before.state.is_alarm and before.cause == Cause.SINGLE_CONNECTION.value
    assert "grpc_balance_mw.balanced_channel" in (before.advice or "")
    detector.lanes_opened()
    lanes = [LaneEvidence(), LaneEvidence(), LaneEvidence()]
    for _ in range(20):  # the lanes' first calls, on three pods
        for lane, pod in zip(lanes, "abc", strict=True):
            now += 0.001
            detector.record(pod, now=now, lane=lane)
    after = detector.snapshot(now=now)
    assert after.state.is_alarm and after.lanes == 4, after  # still uneven: the old calls
    assert after.advice == advice(Cause(after.cause), on_lanes=True) == ON_LANES
    assert "grpc_balance_mw.balanced_channel" not in after.advice
    detector.lanes_opened(False)  # the rebalanced channel closed: plain advice again
    assert detector.snapshot(now=now).advice == advice(Cause(after.cause))


@pytest.mark.parametrize("cause", list(Cause))
def test_only_the_causes_lanes_fix_get_the_after_the_move_advice(cause: Cause) -> None:
    fixed = cause in (Cause.SINGLE_CONNECTION, Cause.ROTATION_SKEWED, Cause.FEW_CONNECTIONS)
    assert (advice(cause, on_lanes=True) == ON_LANES) is fixed
    # ClientIP affinity: lanes cannot help either, and the plain advice says so already.
    assert (advice(cause, on_lanes=True) == advice(cause)) is not fixed


@pytest.mark.parametrize("mode", MODES)
def test_bad_settings_and_a_factory_of_the_other_form_are_refused(mode: str) -> None:
    make = factory(mode, "x.invalid:1")
    for bad in (
        {"factory": None},
        {"when": "sometimes"},
        {"check_interval_s": 0},
        {"lanes": 0},
        {"retry": 3},
    ):
        with pytest.raises(ConfigurationError):
            Rebalance(**{"factory": make, **bad})  # type: ignore[arg-type]
    other = factory("aio" if mode == "sync" else "sync", "x.invalid:1")

    async def main() -> None:
        with pytest.raises(ConfigurationError, match="channel_factory"):
            observed(mode, "x.invalid:1", Rebalance(other, when="always"))
        assert not [t for t in threading.enumerate() if _ours(t)]

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_without_an_alarm_calls_stay_on_the_channel(sync_pod: Any, mode: str) -> None:
    rebalance = Rebalance(factory(mode, sync_pod.target), check_interval_s=0.02)

    async def main() -> None:
        # One pod, and no more expected: nothing to alarm about.
        channel = observed(
            mode, sync_pod.target, rebalance, ObserveOptions(registry=AffinityRegistry())
        )
        try:
            looks = count_calls(channel.rebalancer, "due")
            assert await Stub(mode, channel).get(30) == {OK}
            # A negative claim: the watcher has looked at the detector five times since.
            seen = len(looks)
            assert await until(lambda: len(looks) >= seen + 5, 10), looks
            assert channel.rebalancer.balanced is None and "watching" in repr(channel.rebalancer)
        finally:
            await close_channel(mode, channel)

    asyncio.run(main())


class Tag(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Notes the methods of the unary calls it sees."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method  # bytes in grpc.aio
        self.methods.append(method.decode() if isinstance(method, bytes) else method)
        return await continuation(details, request)


async def test_an_aio_channel_made_with_interceptors_moves_through_the_factory_s(
    sync_pod: Any,
) -> None:
    """An aio channel with interceptors is observed by interceptors appended to it; its calls
    move all the same, and then run through the channels (and interceptors) the factory makes."""
    target, mine, lanes_own = sync_pod.target, Tag(), Tag()

    def make(extra: Any, interceptors: Any) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            target, options=extra, interceptors=[lanes_own, *interceptors]
        )

    channel = balance_aio.observe(
        grpc.aio.insecure_channel(target, interceptors=[mine]),
        ObserveOptions(registry=AffinityRegistry()),
        rebalance=Rebalance(make, when="always"),
        target=target,
    )
    balanced = channel.rebalancer.balanced
    try:
        assert await Stub("aio", channel).get(5) == {OK}
        assert lanes_own.methods.count(GET) == 5 and mine.methods == []
        assert lane_calls(balanced) == 5
    finally:
        await channel.close()
    assert balanced.pool.closed


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_a_balanced_channel_made_directly_marks_its_target_on_lanes(mode: str) -> None:
    """A user who built a balanced channel themselves gets the on-lanes advice too, while it is
    open, and the plain advice once it is closed. (Its target refuses connections: the lanes
    add no calls of their own to the detector.)"""
    target = "127.0.0.1:1"
    registry = AffinityRegistry()
    options = ObserveOptions(registry=registry, expected_pods=3)
    detector = registry.detector(target)
    detector.expected_pods = 3
    pinned = LaneEvidence()
    for _ in range(100):
        detector.record("a", lane=pinned)
    plain = advice(Cause.SINGLE_CONNECTION)
    assert detector.snapshot().advice == plain

    if mode == "sync":
        channel = balanced_channel(target, observe=options)
        assert detector.snapshot().advice == ON_LANES
        channel.close()
        channel.close()  # twice: unmarked once
    else:

        async def main() -> None:
            channel = balance_aio.balanced_channel(target, observe=options)
            assert detector.snapshot().advice == ON_LANES
            await channel.close()
            await channel.close()

        asyncio.run(main())
    assert detector.snapshot().advice == plain
