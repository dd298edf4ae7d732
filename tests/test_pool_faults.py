"""The pure pool under faults (fake clock, no sockets): a pod that hangs, every lane lost at once,
dials that keep failing."""

from __future__ import annotations

import itertools
import random

import pytest
from pool_fakes import FakeClock, active_pods, run, scripted

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool import CheckResult, Lane, LanePool, PoolConfig, rotate_never


def pool(config: PoolConfig) -> LanePool:
    return LanePool(config, rotation=rotate_never(), clock=FakeClock(0.0), rng=random.Random(1))


def test_a_lane_whose_checks_go_unanswered_is_drained_and_replaced() -> None:
    lanes = pool(PoolConfig(expected_pods=3, scout_interval_s=None, health_interval_s=1))
    run(lanes, scripted(["pod-0", "pod-1", "pod-2"]), now=0.0)

    def hung(lane: Lane) -> CheckResult:
        return CheckResult(reachable=lane.pod != "pod-2", pod=lane.pod)

    run(lanes, hung, now=1.0)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]  # one lost check is forgiven
    run(lanes, hung, now=2.0)
    assert active_pods(lanes) == ["pod-0", "pod-1"]
    assert "unresponsive" in repr([lane for lane in lanes.lanes if lane.is_draining()])
    plan = run(lanes, scripted(["pod-2", "pod-3"]), now=2.1)
    assert len(plan.dial) == 1  # its replacement


def test_an_answered_check_resets_the_count() -> None:
    lanes = pool(
        PoolConfig(expected_pods=1, min_lanes=1, scout_interval_s=None, health_interval_s=1)
    )
    run(lanes, scripted(["pod-0"]), now=0.0)
    flaky = iter([False, True, False, True])
    for second in range(1, 5):
        run(lanes, lambda lane: CheckResult(next(flaky), lane.pod), now=float(second))
    assert active_pods(lanes) == ["pod-0"]


def test_with_every_lane_failed_the_newest_draining_lane_still_takes_calls() -> None:
    lanes = pool(PoolConfig(expected_pods=3, scout_interval_s=None))
    run(lanes, scripted(["pod-0", "pod-1", "pod-2"]), now=0.0)
    for _ in range(3):  # the Service restarted: a call on each lane fails UNAVAILABLE
        lanes.release(lanes.acquire(), unavailable=True)
    down = lambda lane: CheckResult(reachable=False)  # noqa: E731
    for tick in range(20):
        run(lanes, down, now=0.1 * tick)
        lane = lanes.acquire()  # never "no lane": the newest drained lane is kept for this
        lanes.release(lane)
    kept = [lane for lane in lanes.lanes if lane.is_draining()]
    assert len(kept) == 1
    run(lanes, scripted(["pod-0", "pod-1", "pod-2"]), now=5.0)
    run(lanes, scripted(["pod-0", "pod-1", "pod-2"]), now=5.1)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    assert not [lane for lane in lanes.lanes if lane.is_draining()]  # closed once others are up


def test_failed_dials_back_off_at_most_a_second() -> None:
    lanes = pool(PoolConfig(min_lanes=1, scout_interval_s=None))
    down = lambda lane: CheckResult(reachable=False)  # noqa: E731
    dials = [t / 10 for t in range(200) if run(lanes, down, now=t / 10).dial]
    gaps = [later - earlier for earlier, later in itertools.pairwise(dials)]
    assert max(gaps) == pytest.approx(1.0, abs=0.11)


def test_unanswered_checks_must_be_at_least_one() -> None:
    with pytest.raises(ConfigurationError, match="unanswered_checks"):
        PoolConfig(unanswered_checks=0)


def test_lanes_drained_for_unavailable_are_replaced_with_backoff() -> None:
    """A sidecar that answers every call UNAVAILABLE itself ("no healthy upstream", no pod
    named) while health checks pass: each failed call drains its lane. Replacements must back
    off (before: a new connection per failed call, 76 a second under 32 threads)."""
    clock = FakeClock(0.0)
    lanes = LanePool(
        PoolConfig(expected_pods=3, scout_interval_s=None),
        rotation=rotate_never(),
        clock=clock,
        rng=random.Random(1),
    )
    reach = lambda lane: CheckResult(True, lane.pod or f"pod-{lane.id % 3}")  # noqa: E731
    run(lanes, reach)
    first = lanes.dials
    while clock.now < 10.0:  # rounds as the channels run them: back to back after a dial
        plan = run(lanes, reach)
        for _ in range(32):  # calls from 32 threads, each failing UNAVAILABLE
            lanes.release(lanes.acquire(), unavailable=True)
        clock.advance(0.005 if plan.dial else 0.25)
    assert lanes.dials - first <= 40  # at most a lane's worth a second, once backed off
    assert lanes.dials - first >= 9  # but it keeps trying: the sidecar may heal


def test_a_drain_for_unavailable_after_an_answered_call_is_replaced_at_once() -> None:
    lanes = pool(PoolConfig(min_lanes=1, expected_pods=1, scout_interval_s=None))
    reach = lambda lane: CheckResult(True, "pod-0")  # noqa: E731
    run(lanes, reach, now=0.0)
    lanes.release(lanes.acquire(), unavailable=True)  # a pod killed: replaced at once
    assert run(lanes, reach, now=0.0).dial
    lanes.release(lanes.acquire(), unavailable=True)  # again, no call answered since: backoff
    assert not run(lanes, reach, now=0.05).dial
    assert run(lanes, reach, now=0.1).dial
    lanes.release(lanes.acquire())  # a call answered: the next drain is replaced at once
    lanes.release(lanes.acquire(), unavailable=True)
    assert run(lanes, reach, now=0.1).dial
