"""The lane pool's bookkeeping, without sockets: coverage, rotation, draining, scouting, stuck."""

from __future__ import annotations

import itertools
import random

import pytest
from pool_fakes import FakeClock, KubeProxy, active_pods, call, run, scripted, settle

from grpc_balance_mw.affinity.advice import VOICES, Cause, cause_of_stuck
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool import (
    CheckResult,
    LanePool,
    LaneState,
    PoolClosed,
    PoolConfig,
    Signals,
    rotate_after_age,
    rotate_never,
)

NO_SCOUT = PoolConfig(scout_interval_s=None)


def pool(config: PoolConfig = NO_SCOUT, seed: int = 0, **kwargs: object) -> LanePool:
    return LanePool(config, clock=FakeClock(), rng=random.Random(seed), **kwargs)  # type: ignore[arg-type]


def test_lanes_that_reach_a_covered_pod_are_redialled_until_pods_are_distinct() -> None:
    lanes = pool(PoolConfig(expected_pods=3, scout_interval_s=None))
    plan = run(lanes, scripted(["pod-0", "pod-0", "pod-1", "pod-0", "pod-2"]))
    assert len(plan.dial) == 3
    assert repr(lanes) == "<LanePool 3 lanes: 1 dialing, 2 active>"
    plan = run(lanes, scripted(["pod-0", "pod-2"]))
    assert [lane.attempt for lane in plan.dial] == [1]
    settle(lanes, scripted(["pod-2"]))
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    assert repr(lanes) == "<LanePool 3 lanes: 3 active>"
    assert lanes.redials == 2


def test_random_kube_proxy_picks_end_on_distinct_pods_far_more_often_than_first_tries() -> None:
    """3 connections to 3 pods are all distinct 22 % of the time; the redials fix most."""
    first, settled, runs = 0, 0, 300
    for seed in range(runs):
        rng = random.Random(seed)
        lanes = LanePool(NO_SCOUT, clock=FakeClock(), rng=rng)
        proxy = KubeProxy(3, rng)
        first += len({proxy(lane).pod for lane in run(lanes, proxy).dial}) == 3
        settle(lanes, proxy)
        settled += len(set(active_pods(lanes))) == 3
    assert first / runs < 0.35
    assert settled / runs > 0.9


def test_lanes_follow_the_pods_known_within_min_and_max() -> None:
    lanes = pool(PoolConfig(min_lanes=2, max_lanes=4, expected_pods=6, scout_interval_s=None))
    proxy = KubeProxy(6, random.Random(5))
    settle(lanes, proxy)
    assert len(active_pods(lanes)) == 4
    small = pool(PoolConfig(min_lanes=2, max_lanes=4, follow_pods=False, expected_pods=6))
    settle(small, proxy)
    assert len(active_pods(small)) == 2


def test_a_rotated_lane_drains_only_after_its_replacement_is_checked() -> None:
    clock = FakeClock()
    lanes = LanePool(
        PoolConfig(scout_interval_s=None, expected_pods=3, drain_grace_s=10),
        rotation=rotate_after_age(30, jitter=0),
        clock=clock,
        rng=random.Random(0),
    )
    settle(lanes, scripted(["pod-0", "pod-1", "pod-2"]))
    call = lanes.acquire()
    old = call
    clock.advance(31)
    plan = lanes.plan()
    assert len(plan.dial) == 3 and {lane.replaces for lane in plan.dial} == {1, 2, 3}
    assert old.is_available()  # still taking calls while its replacement is checked
    pods = {lane.id: lane.pod for lane in lanes.lanes}
    for lane in plan.dial:  # each replacement reaches the pod of the lane it replaces
        lane.connection = object()
        lanes.checked(lane, CheckResult(True, pods[lane.replaces]))
    assert old.state is LaneState.DRAINING and old.reason == "age"
    plan = lanes.plan()
    assert old not in plan.close  # a call is still on it
    assert repr(lanes) == "<LanePool 4 lanes: 3 active, 1 draining>"
    lanes.release(old)
    assert old in lanes.plan().close
    assert repr(lanes) == "<LanePool 3 lanes: 3 active>"
    assert lanes.rotations == 3


def test_a_draining_lane_gets_no_calls_and_closes_after_the_grace_period() -> None:
    clock = FakeClock()
    lanes = LanePool(
        PoolConfig(scout_interval_s=None, expected_pods=2, min_lanes=2, drain_grace_s=10),
        rotation=rotate_after_age(30, jitter=0),
        clock=clock,
        rng=random.Random(0),
    )
    settle(lanes, scripted(["pod-0", "pod-1"]))
    stream = lanes.acquire()
    clock.advance(30)
    run(lanes, scripted(["pod-0", "pod-1"]))
    assert stream.is_draining()
    assert all(lanes.acquire() is not stream for _ in range(50))
    clock.advance(9)
    assert stream not in lanes.plan().close
    clock.advance(1)
    assert stream in lanes.plan().close
    assert stream.is_closed() and stream.reason == "age"


def test_an_unavailable_call_takes_its_lane_out_at_once_and_a_new_one_is_dialled() -> None:
    lanes = pool(PoolConfig(expected_pods=3, scout_interval_s=None))
    settle(lanes, scripted(["pod-0", "pod-1", "pod-2"]))
    broken = next(lane for lane in lanes.lanes if lane.pod == "pod-1")
    while lanes.acquire() is not broken:
        pass
    lanes.release(broken, unavailable=True)
    assert broken.is_draining() and broken.reason == "unavailable"
    plan = run(lanes, scripted(["pod-3"]))
    assert broken in plan.close and [lane.pod for lane in plan.dial] == ["pod-3"]
    assert active_pods(lanes) == ["pod-0", "pod-2", "pod-3"]


def test_a_lane_that_fails_while_rotating_is_not_replaced_twice_for_long() -> None:
    clock = FakeClock()
    lanes = LanePool(
        PoolConfig(expected_pods=3, scout_interval_s=None),
        rotation=rotate_after_age(30, jitter=0),
        clock=clock,
        rng=random.Random(0),
    )
    settle(lanes, scripted(["pod-0", "pod-1", "pod-2"]))
    clock.advance(30)
    call(lanes)  # a channel in use (an idle one rotates nothing by age)
    plan = lanes.plan()  # three replacements are dialled...
    failing = lanes.acquire()
    lanes.release(failing, unavailable=True)  # ...and one old lane fails meanwhile,
    fill = lanes.plan().dial  # so a lane to fill its place is dialled too
    assert [lane.purpose.value for lane in fill] == ["fill"]
    pods = {lane.id: lane.pod for lane in lanes.lanes}
    for lane in [*plan.dial, *fill]:  # replacements reach their lanes' pods, the fill too
        lane.connection = object()
        lanes.checked(lane, CheckResult(True, pods.get(lane.replaces) or failing.pod))
    settle(lanes, scripted([]))
    # The failed lane's replacement and the lane filling its place both came: one is surplus.
    assert len(active_pods(lanes)) == 3 and len(set(active_pods(lanes))) == 3, lanes


def test_session_affinity_is_recognised_and_redialling_stops() -> None:
    lanes = pool(PoolConfig(expected_pods=3, scout_interval_s=0.5))
    always = scripted(["pod-1"] * 1000)
    now = 0.0
    for _ in range(20):
        plan = run(lanes, always, now=now)
        now += 0.5
        if plan.stuck is not None:
            break
    stuck = lanes.stuck
    assert stuck is not None and stuck.cause == "session-affinity" and stuck.pod == "pod-1"
    assert "sessionAffinity: ClientIP" in stuck.message and "3 pods are known" in stuck.message
    assert repr(lanes) == "<LanePool 3 lanes: 3 active; stuck (session-affinity)>"
    dials = lanes.dials
    for _ in range(40):  # 20 s: no redials, no scouts, no rotation
        run(lanes, always, now=now)
        now += 0.5
    assert lanes.dials == dials
    # The recheck scout (every 30 s) that reaches another pod ends it.
    anywhere = scripted(itertools.cycle(["pod-2", "pod-0", "pod-1"]))
    for _ in range(40):
        run(lanes, anywhere, now=now)
        now += 0.5
    assert lanes.stuck is None and "pod-2" in active_pods(lanes)


def test_one_pod_or_client_ip_with_no_pod_count_stops_redialling_within_20_dials() -> None:
    """Default options behind ClientIP (or one ready pod): no other pod is ever known, yet the
    fresh connections that all land on one pod say redialling cannot help."""
    lanes = pool(PoolConfig(scout_interval_s=0.25))
    always = scripted(["pod-1"] * 1000)
    now = 0.0
    for _ in range(40):
        run(lanes, always, now=now)
        now += 0.25
        if lanes.stuck is not None:
            break
    stuck = lanes.stuck
    assert stuck is not None and stuck.cause == "one-pod-or-client-ip", lanes
    assert cause_of_stuck(stuck.cause) is Cause.ONE_POD_OR_CLIENT_IP
    assert VOICES[Cause.ONE_POD_OR_CLIENT_IP].cause in stuck.message
    assert "no other pod is known" in stuck.message
    assert lanes.dials <= 20, lanes.dials
    dials = lanes.dials
    for _ in range(80):  # 20 s: nothing dialled
        run(lanes, always, now=now)
        now += 0.25
    assert lanes.dials == dials
    # A scale-up of a one-pod Service: the recheck scout (every 30 s) that finds another pod.
    anywhere = scripted(itertools.cycle(["pod-2", "pod-0", "pod-1"]))
    for _ in range(160):
        run(lanes, anywhere, now=now)
        now += 0.25
    assert lanes.stuck is None and len(set(active_pods(lanes))) >= 2, lanes


def test_an_l7_proxy_stops_rotation() -> None:
    lanes = pool(PoolConfig(expected_pods=3, scout_interval_s=0.5), rotation=rotate_after_age(1))
    plan = run(lanes, scripted(["pod-0", "pod-1", "pod-2"]), now=0.0)
    plan = run(lanes, scripted([]), now=10.0, signals=Signals(alarm="l7-balanced"))
    assert plan.stuck is not None and "L7 proxy" in plan.stuck.message
    assert not plan.dial
    plan = run(lanes, scripted(["pod-0"] * 4), now=20.0, signals=Signals(alarm="balanced"))
    assert lanes.stuck is None and plan.dial


def test_an_unreachable_target_is_redialled_with_backoff() -> None:
    lanes = pool(PoolConfig(min_lanes=1, scout_interval_s=None))
    down = lambda lane: CheckResult(reachable=False)  # noqa: E731
    assert len(run(lanes, down, now=0.0).dial) == 1
    assert not run(lanes, down, now=0.05).dial
    assert len(run(lanes, down, now=0.1).dial) == 1
    assert not run(lanes, down, now=0.25).dial  # backed off 0.2 s now
    assert len(run(lanes, scripted(["pod-0"]), now=0.35).dial) == 1
    assert active_pods(lanes) == ["pod-0"]


def test_not_serving_pods_are_rotated_away_from() -> None:
    lanes = pool(
        PoolConfig(expected_pods=2, min_lanes=2, scout_interval_s=None, health_interval_s=1)
    )
    run(lanes, scripted(["pod-0", "pod-1"]), now=0.0)
    sick = lambda lane: CheckResult(True, lane.pod, serving=lane.pod != "pod-1")  # noqa: E731
    run(lanes, sick, now=1.0)  # the health checks find pod-1 NOT_SERVING
    plan = run(lanes, scripted(["pod-2"]), now=1.1)
    assert [lane.pod for lane in plan.dial] == ["pod-2"]
    assert active_pods(lanes) == ["pod-0", "pod-2"]


def test_calls_go_to_lanes_being_checked_before_any_is_active_and_fail_once_closed() -> None:
    lanes = pool(rotation=rotate_never())
    with pytest.raises(PoolClosed):
        lanes.acquire()  # nothing dialled yet
    plan = lanes.plan()
    for lane in plan.dial:
        lane.connection = object()
    early = lanes.acquire()
    assert early.state is LaneState.CHECKING
    closing = lanes.close()
    assert set(closing) == set(plan.dial) and all(lane.is_closed() for lane in closing)
    assert repr(lanes) == "<LanePool 0 lanes; closed>"
    with pytest.raises(PoolClosed):
        lanes.acquire()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        PoolConfig(min_lanes=4, max_lanes=3)
    with pytest.raises(ConfigurationError):
        PoolConfig(scout_interval_s=0)
