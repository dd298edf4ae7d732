"""An idle balanced channel scouts slowly while nothing changes, and fast again at once when
calls are made or something changes (the pure pool, a fake clock and kube-proxy)."""

from __future__ import annotations

import itertools
import random

import pytest
from pool_fakes import FakeClock, KubeProxy, active_pods, call, drive, run, scripted

from grpc_balance_mw.pool import CheckResult, LanePool, PoolConfig, Signals, rotate_never

OLD, NEW = {"pod-0", "pod-1", "pod-2"}, {"pod-3", "pod-4"}


def settled(
    seed: int = 0, config: PoolConfig | None = None
) -> tuple[LanePool, KubeProxy, FakeClock]:
    rng = random.Random(seed)
    clock = FakeClock()
    lanes = LanePool(config or PoolConfig(), rotation=rotate_never(), clock=clock, rng=rng)
    proxy = KubeProxy(3, rng)
    assert drive(lanes, proxy, clock, lambda: set(active_pods(lanes)) >= OLD, 10.0) is not None
    return lanes, proxy, clock


def dials_over(lanes: LanePool, proxy: KubeProxy, clock: FakeClock, seconds: float) -> int:
    before = lanes.dials
    drive(lanes, proxy, clock, lambda: False, seconds, calls=False)
    return lanes.dials - before


def test_an_idle_stable_pool_backs_off_to_one_scout_per_idle_max() -> None:
    lanes, proxy, clock = settled()
    dials_over(lanes, proxy, clock, 70.0)  # backing off: 0.25, 0.5, ... 32 s
    assert dials_over(lanes, proxy, clock, 64.0) <= 3  # 4 a second before: 256
    busy = lanes.dials
    drive(lanes, proxy, clock, lambda: False, 2.0)  # calls again: the fast pace at once
    assert lanes.dials - busy >= 6


def test_no_back_off_when_disabled() -> None:
    lanes, proxy, clock = settled(config=PoolConfig(scout_idle_max_s=None))
    assert dials_over(lanes, proxy, clock, 10.0) >= 35


def test_a_failed_health_check_brings_the_fast_pace_back() -> None:
    lanes, proxy, clock = settled()
    dials_over(lanes, proxy, clock, 60.0)
    lane = next(lane for lane in lanes.lanes if lane.is_available())
    assert dials_over(lanes, proxy, clock, 1.0) <= 1  # backed off
    lanes.checked(lane, CheckResult(True, lane.pod, serving=False))
    # The fast pace at once (0.25 s, then backing off again while nothing more changes).
    assert dials_over(lanes, proxy, clock, 1.0) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("runs", [200])
def test_a_scale_up_while_idle_is_found_within_5_s_of_the_first_calls(runs: int) -> None:
    """The bound of a channel in use holds from the first call after the idle spell."""
    missed = 0
    for seed in range(runs):
        lanes, proxy, clock = settled(seed)
        dials_over(lanes, proxy, clock, 60.0)
        proxy.scale(5)
        dials_over(lanes, proxy, clock, random.Random(seed).uniform(0, 32))
        call(lanes)
        took = drive(lanes, proxy, clock, lambda lanes=lanes: set(active_pods(lanes)) >= NEW, 5.0)
        missed += took is None
    assert missed <= runs // 100, missed


def test_an_idle_pool_lets_its_rounds_wait_and_asks_for_signals_seldom() -> None:
    lanes, proxy, clock = settled()
    dials_over(lanes, proxy, clock, 60.0)
    asked: list[float] = []

    def signals() -> Signals:
        asked.append(clock.now)
        return Signals()

    idle = []
    for _ in range(12):  # most rounds wait (nothing due); a few check lanes
        plan = run(lanes, proxy, signals=signals)  # type: ignore[arg-type]
        idle.append(plan.idle_s)
        clock.advance(plan.pause(0.25))
    waits = [wait for wait in idle if wait is not None]
    assert len(waits) >= 8 and all(0 <= wait <= 5.0 for wait in waits), idle
    # Every 5 s at most while no call is made (every round before).
    assert asked and all(b - a >= 5.0 for a, b in itertools.pairwise(asked)), asked
    call(lanes)
    assert run(lanes, proxy, signals=signals).idle_s is None  # type: ignore[arg-type]
    assert asked[-1] == clock.now  # a call: the detector is asked at once, rounds every tick


def test_an_idle_pool_checks_its_lanes_less_often_and_all_at_once_on_a_call() -> None:
    lanes, proxy, clock = settled()
    dials_over(lanes, proxy, clock, 60.0)
    checked: list[float] = []
    end = clock.now + 60.0
    while clock.now < end:
        plan = run(lanes, proxy)
        checked += [clock.now for _ in plan.check]
        clock.advance(plan.pause(0.25))
    assert 3 <= len(checked) <= 3 * 4, checked  # every 20 s per lane (every 5 s: 36)
    call(lanes)
    clock.advance(5.0)
    assert len(run(lanes, proxy).check) == 3  # in use again: every lane checked at once


def test_scouting_stays_fast_while_a_lane_doubles_a_pod_and_a_third_may_exist() -> None:
    """3 lanes on 2 of 3 pods (the third not met yet): no back-off until the scouts find it."""
    config = PoolConfig(redials=0, burst_per_pod=0)  # one scout at a time, no start burst
    lanes = LanePool(config, rotation=rotate_never(), clock=FakeClock())
    run(lanes, scripted(["pod-0", "pod-1", "pod-1"]))
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-1"]
    before = lanes.dials
    for _ in range(8):  # 2 s: each scout reaches a known pod
        lanes.clock.advance(0.25)  # type: ignore[attr-defined]
        run(lanes, scripted(["pod-0"]))
    assert lanes.dials - before == 8  # still four a second


def test_the_first_call_after_an_idle_round_wakes_the_adapter_once() -> None:
    """An idle round lets the adapter wait up to 5 s; the call that ends the idle spell wakes
    it at once (so the fast pace is back with that call, not a round later), and only that
    call: calls on a busy channel wake nothing."""
    lanes, proxy, clock = settled()
    dials_over(lanes, proxy, clock, 60.0)
    woken: list[float] = []
    lanes.on_wake = lambda: woken.append(clock.now)
    assert run(lanes, proxy).idle_s is not None  # idle: the adapter may sleep
    assert woken == []
    call(lanes)
    call(lanes)
    assert woken == [clock.now]  # the first call, once
    plan = run(lanes, proxy)
    assert plan.idle_s is None  # in use: rounds every tick again
    call(lanes)
    assert woken == [clock.now]  # no idle round since: nothing to wake
