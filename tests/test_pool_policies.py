"""The pool's small policies, without sockets: lanes' predicates, pickers, rotation policies."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool import (
    Lane,
    LaneState,
    LeastOutstanding,
    RotationContext,
    RoundRobin,
    rotate_after_age,
    rotate_after_calls,
    rotate_any,
    rotate_never,
    rotate_on_alarm,
    rotate_when_pod_gone,
)


def active_lane(lane_id: int, pod: str = "pod-0", at: float = 0.0) -> Lane:
    lane = Lane(lane_id, at)
    lane.state = LaneState.ACTIVE
    lane.activated_at = at
    lane.pod = pod
    return lane


def test_lane_predicates() -> None:
    lane = Lane(7, 10.0)
    assert (lane.name, lane.is_pending(), lane.is_available()) == ("lane-7", True, False)
    lane.state = LaneState.ACTIVE
    lane.activated_at, lane.rotate_at = 10.0, 70.0
    assert lane.is_available() and lane.is_idle()
    assert not lane.has_expired(69.9) and lane.has_expired(70.0)
    assert lane.age(25.0) == 15.0
    lane.in_flight = 1
    lane.state, lane.draining_since = LaneState.DRAINING, 80.0
    assert lane.is_draining() and not lane.is_idle()
    assert not lane.drain_expired(89.0, 10.0) and lane.drain_expired(90.0, 10.0)
    assert repr(lane) == "<Lane lane-7 draining: 0 calls, 1 in flight>"


def test_round_robin_takes_each_lane_in_turn() -> None:
    lanes = [active_lane(i) for i in range(3)]
    pick = RoundRobin()
    assert [pick(lanes).id for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_prefers_the_lane_with_fewer_calls_in_flight() -> None:
    lanes = [active_lane(i) for i in range(4)]
    for lane, load in zip(lanes, (5, 1, 5, 5), strict=True):
        lane.in_flight = load
    pick = LeastOutstanding(choices=4, run=1, rng=random.Random(1))
    assert pick(lanes) is lanes[1]
    # Of two random choices (beyond 8 lanes), the busier is taken only if drawn with an equal.
    many = [active_lane(i) for i in range(12)]
    many[0].in_flight = 9
    two = LeastOutstanding(rng=random.Random(2))
    assert all(two(many) is not many[0] for _ in range(200))
    # A run on one lane ends as soon as it has more calls in flight than a drawn lane...
    idle = [active_lane(i) for i in range(3)]
    for lane in idle:
        lane.last_picked = lane.id + 1  # as the pool counts picks
    runs = LeastOutstanding(choices=3, run=16, rng=random.Random(2))
    first = runs(idle)
    assert all(runs(idle) is first for _ in range(5))
    first.in_flight = 1
    assert runs(idle) is not first
    first.in_flight = 0
    # ...or as soon as an active lane that never took a call joins (a new pod's lane), but not
    # for one still being checked (calls go to those only while no lane is active).
    first = runs(idle)
    checking = Lane(8, 0.0)
    checking.state = LaneState.CHECKING
    assert runs([*idle, checking]) is first
    fresh = active_lane(9)
    assert runs([*idle, fresh]) is fresh


@pytest.mark.parametrize("run", [1, 16])
def test_least_outstanding_spreads_sequential_calls_evenly(run: int) -> None:
    """Sequential calls always see 0 in flight: runs of ``run`` picks, then the least recently
    picked of the two drawn lanes."""
    lanes = [active_lane(i) for i in range(3)]
    pick = LeastOutstanding(run=run, rng=random.Random(3))
    counts: Counter[int] = Counter()
    order = []
    for sequence in range(1, 3001):
        lane = pick(lanes)
        lane.last_picked = sequence
        counts[lane.id] += 1
        order.append(lane.id)
    assert max(counts.values()) / 1000 <= 1.04, counts
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches == pytest.approx(3000 / run, rel=0.05)


def test_pickers_reject_bad_settings() -> None:
    with pytest.raises(ConfigurationError):
        LeastOutstanding(choices=1)
    with pytest.raises(ConfigurationError):
        LeastOutstanding(run=0)
    with pytest.raises(ConfigurationError):
        rotate_after_age(0)
    with pytest.raises(ConfigurationError):
        rotate_after_calls(0)


def test_rotate_after_age_is_jittered_within_bounds() -> None:
    policy = rotate_after_age(10, jitter=0.2)
    rng = random.Random(4)
    times = [policy.rotate_at(100.0, rng) for _ in range(200)]
    assert all(t is not None and 108.0 <= t <= 112.0 for t in times)
    assert len(set(times)) > 100  # lanes made together do not rotate together
    lane = active_lane(1)
    lane.rotate_at = 110.0
    assert policy.why(lane, RotationContext(109.0)) is None
    assert policy.why(lane, RotationContext(110.0)) == "age"


def test_rotate_after_calls() -> None:
    lane = active_lane(1)
    lane.calls = 99
    assert not rotate_after_calls(100)(lane, RotationContext(0.0))
    lane.calls = 100
    assert rotate_after_calls(100).why(lane, RotationContext(0.0)) == "calls"


def test_rotate_on_alarm_only_moves_lanes_on_the_top_pod_once_they_have_aged() -> None:
    policy = rotate_on_alarm(min_age_s=5)
    on_top, elsewhere = active_lane(1, "pod-0", at=0.0), active_lane(2, "pod-1", at=0.0)
    pinned = RotationContext(10.0, alarm="pinned", top_pod="pod-0")
    assert policy.why(on_top, pinned) == "alarm pinned"
    assert policy.why(elsewhere, pinned) is None
    assert policy.why(on_top, RotationContext(10.0, alarm="balanced", top_pod="pod-0")) is None
    assert policy.why(on_top, RotationContext(4.0, alarm="pinned", top_pod="pod-0")) is None


def test_rotate_when_pod_gone() -> None:
    lane = active_lane(1, "pod-3")
    policy = rotate_when_pod_gone()
    assert policy.why(lane, RotationContext(0.0)) is None
    assert policy.why(lane, RotationContext(0.0, down_pods=frozenset({"pod-3"}))) == "pod down"
    lane.unavailable = 1
    assert policy.why(lane, RotationContext(0.0)) == "unavailable"


def test_policies_compose_with_or_and_the_first_reason_wins() -> None:
    policy = rotate_after_calls(10) | rotate_after_age(30, jitter=0) | rotate_never()
    assert isinstance(policy, rotate_any) and len(policy.policies) == 3
    assert (
        repr(policy) == "rotate_after_calls(10) | rotate_after_age(30, jitter=0) | rotate_never()"
    )
    assert policy.rotate_at(5.0, random.Random()) == 35.0
    lane = active_lane(1)
    lane.rotate_at, lane.calls = 35.0, 10
    assert policy.why(lane, RotationContext(40.0)) == "calls"
    lane.calls = 0
    assert policy.why(lane, RotationContext(40.0)) == "age"
    assert not rotate_never()(lane, RotationContext(1e9))
    assert rotate_never().rotate_at(0.0, random.Random()) is None


class _Reference:
    """LeastOutstanding's rule as first written (``min`` with a key), to check the picker
    against: the fewest in flight, then the least recently picked, of all lanes (up to 8) or of
    ``choices`` drawn; a run stays on its lane unless it is busier than the best or a lane that
    is active and was never picked is the best, or the run's lane is gone."""

    def __init__(self, choices: int, run: int, rng: random.Random) -> None:
        self.choices, self.run, self._rng = choices, run, rng
        self._last: Lane | None = None
        self._left = 0

    def __call__(self, lanes: list[Lane]) -> Lane:
        drawn = (
            lanes if len(lanes) <= max(self.choices, 8) else self._rng.sample(lanes, self.choices)
        )
        best = min(drawn, key=lambda lane: (lane.in_flight, lane.last_picked))
        last, fresh = self._last, best.last_picked == 0 and best.is_available()
        stays = self._left > 0 and last is not None and last.in_flight <= best.in_flight
        if stays and not fresh and last in lanes:
            assert last is not None
            self._left -= 1
            return last
        self._last, self._left = best, self.run - 1
        return best


@pytest.mark.parametrize("count", [1, 3, 8, 12])
def test_least_outstanding_picks_as_its_rule_says(count: int) -> None:
    states = random.Random(count)
    lanes = [active_lane(i) for i in range(count)]
    pick = LeastOutstanding(choices=2, run=4, rng=random.Random(7))
    reference = _Reference(2, 4, random.Random(7))
    for sequence in range(1, 2001):
        for lane in lanes:  # calls come and go; lanes are checked, replaced, never picked
            lane.in_flight = max(0, lane.in_flight + states.choice((-1, 0, 0, 1)))
            lane.state = states.choice([LaneState.ACTIVE] * 5 + [LaneState.CHECKING])
            if states.random() < 0.02:
                lane.last_picked = 0
        offered = [lane for lane in lanes if states.random() < 0.9] or lanes[:1]
        chosen = pick(offered)
        assert chosen is reference(offered), sequence
        chosen.last_picked = sequence
