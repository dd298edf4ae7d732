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
