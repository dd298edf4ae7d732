"""The pure pool and a pod that stamps a new identity on every call (fake clock, no sockets).

Its names must not count as pods: before, each scout that reached it found "a new pod" (a lane,
a burst), its names filled ``max_lanes``, and it took most of the traffic (enough for the
detector's per-request verdict, ``l7-balanced``, which stops the scouting that finds a scale-up's
pods). A pod's name never seen is believed once a second check on the same connection names it
too; an L7 proxy, which renames every connection's pod call after call, still gets lanes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pool_fakes import FakeClock, KubeProxy, active_pods, call, run

from grpc_balance_mw.pool import CheckResult, Lane, LanePool, PoolConfig, Signals, rotate_never

HOSTILE = "pod-2"


class RenamingPod(KubeProxy):
    """kube-proxy over pods of which ``pod-2`` names itself anew on every check."""

    def __init__(self, pods: int, rng: random.Random) -> None:
        super().__init__(pods, rng)
        self.renames = 0

    def __call__(self, lane: Lane) -> CheckResult:
        result = super().__call__(lane)
        if result.pod == HOSTILE:
            self.renames += 1
            return CheckResult(True, f"renamed-{self.renames}")
        return result

    def detector(self) -> Signals:
        """What the affinity detector says once calls reached the renaming pod (on a lane kept
        before any other lane's pod was named): hundreds of pods."""
        return Signals(known_pods=256 if self.renames else 3)


def rounds(
    lanes: LanePool,
    check: Callable[[Lane], CheckResult],
    clock: FakeClock,
    seconds: float,
    signals: Callable[[], Signals] = Signals,
) -> None:
    end = clock.now + seconds
    while clock.now < end:
        call(lanes)  # a channel in use (an idle one scouts slower)
        plan = run(lanes, check, signals=signals())
        clock.advance(0.005 if plan.dial else 0.25)


def pool(clock: FakeClock, seed: int) -> LanePool:
    return LanePool(PoolConfig(), rotation=rotate_never(), clock=clock, rng=random.Random(seed))


def test_a_pod_that_renames_itself_gets_no_lane_and_no_known_pod() -> None:
    for seed in range(20):
        clock = FakeClock(0.0)
        lanes = pool(clock, seed)
        proxy = RenamingPod(3, random.Random(seed))
        rounds(lanes, proxy, clock, 10.0, proxy.detector)
        assert proxy.renames, seed  # the scouts met it
        pods = active_pods(lanes)
        assert set(pods) == {"pod-0", "pod-1"}, (seed, lanes.lanes)
        assert len(pods) == 3, (seed, lanes.lanes)  # min_lanes, not max_lanes
        assert lanes.stuck is None, seed  # scouting goes on
        assert not [lane for lane in lanes.lanes if lane.pod and "renamed" in lane.pod]
        # A scale-up: the scouts find the new pods.
        proxy.scale(5)
        rounds(lanes, proxy, clock, 5.0, proxy.detector)
        assert {"pod-3", "pod-4"} <= set(active_pods(lanes)), (seed, lanes.lanes)


def test_behind_an_l7_proxy_lanes_are_still_kept_and_its_alarm_stops_rotation() -> None:
    clock = FakeClock(0.0)
    lanes = pool(clock, 1)
    rng = random.Random(1)
    per_request = lambda lane: CheckResult(True, rng.choice(["pod-0", "pod-1", "pod-2"]))  # noqa: E731
    rounds(lanes, per_request, clock, 2.0)
    assert len([lane for lane in lanes.lanes if lane.is_available()]) >= 3, lanes.lanes
    rounds(lanes, per_request, clock, 1.0, lambda: Signals("l7-balanced", None, 3))
    assert lanes.stuck is not None and lanes.stuck.cause == "l7-proxy"


def test_a_new_pods_name_is_believed_after_a_second_check_in_the_same_round() -> None:
    clock = FakeClock(0.0)
    lanes = pool(clock, 0)
    checks: list[int] = []

    def stable(lane: Lane) -> CheckResult:
        checks.append(lane.id)
        return CheckResult(True, f"pod-{lane.id - 1}")

    run(lanes, stable)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    assert sorted(checks) == [1, 1, 2, 2, 3, 3]  # each new name checked twice
    lanes.release(lanes.acquire(), unavailable=True)
    checks.clear()
    run(lanes, lambda lane: CheckResult(True, "pod-1"))  # a name already known: once
    assert len(checks) == 0 or len(checks) == len(set(checks))
