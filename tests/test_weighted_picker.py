"""The weighted picker's pure core: A58's weights from ORCA reports (blackout, expiry, error
penalty, the mean for lanes without one), stride scheduling with calls in flight, slow start
for a pod that joined, and LeastOutstanding's choice whenever no weight applies."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from pool_fakes import FakeClock, KubeProxy, active_pods, drive

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.orca import LoadReport
from grpc_balance_mw.pool import Lane, LanePool, LaneState, LeastOutstanding, PoolConfig
from grpc_balance_mw.pool.pickers import Weighted
from grpc_balance_mw.pool.weights import LaneLoad, SlowStart, WeightConfig, report_weight

QUICK = WeightConfig(blackout_s=1.0, expiration_s=10.0, update_s=0.0)


def active_lane(lane_id: int) -> Lane:
    lane = Lane(lane_id, 0.0)
    lane.state = LaneState.ACTIVE
    lane.activated_at = 0.0
    lane.pod = f"pod-{lane_id}"
    lane.last_picked = lane_id + 1
    return lane


def report(utilization: float, qps: float = 100.0, eps: float = 0.0) -> LoadReport:
    return LoadReport(application_utilization=utilization, rps_fractional=qps, eps=eps)


def picked(pick: Weighted | LeastOutstanding, lanes: list[Lane], calls: int) -> list[int]:
    """The lanes of ``calls`` calls one after another, numbered as the pool numbers picks."""
    order = []
    start = max(lane.last_picked for lane in lanes)
    for sequence in range(start + 1, start + calls + 1):
        lane = pick(lanes)
        lane.last_picked = sequence
        order.append(lane.id)
    return order


def sequential(pick: Weighted | LeastOutstanding, lanes: list[Lane], calls: int) -> Counter[int]:
    """How many of ``calls`` sequential calls (0 in flight) each lane took."""
    return Counter(picked(pick, lanes, calls))


def test_a58_weight_formula() -> None:
    assert report_weight(report(0.5, qps=100), 1.0) == pytest.approx(200)
    # Errors count as utilization: 10 eps at 100 qps adds 0.1 with penalty 1.
    assert report_weight(report(0.5, qps=100, eps=10), 1.0) == pytest.approx(100 / 0.6)
    # The application's utilization wins over the CPU's; without it, the CPU's.
    cpu = LoadReport(cpu_utilization=0.25, rps_fractional=50)
    assert report_weight(cpu, 1.0) == pytest.approx(200)
    both = LoadReport(cpu_utilization=0.25, application_utilization=0.5, rps_fractional=50)
    assert report_weight(both, 1.0) == pytest.approx(100)
    # No qps or no utilization: no weight (ignored, not an idle pod).
    assert report_weight(report(0.0), 1.0) == 0
    assert report_weight(report(0.5, qps=0), 1.0) == 0


def test_blackout_and_expiry() -> None:
    config = WeightConfig(blackout_s=10.0, expiration_s=180.0)
    load = LaneLoad()
    assert load.usable(0.0, config) == 0
    load.add(report(0.5), 100.0, config)
    assert load.usable(109.9, config) == 0  # still in its blackout
    load.add(report(0.5), 109.0, config)
    assert load.usable(110.0, config) == pytest.approx(200)
    # No report for 3 minutes: expired, and the next report starts a new blackout.
    assert load.usable(289.0, config) == 0
    load.add(report(0.25), 290.0, config)
    assert load.usable(295.0, config) == 0
    assert load.usable(300.0, config) == pytest.approx(400)
    # A report without a weight neither starts a blackout nor refreshes one.
    empty = LaneLoad()
    empty.add(report(0.0), 0.0, config)
    assert empty.non_empty_since is None and empty.reports == 1


def test_no_reports_is_exactly_least_outstanding() -> None:
    plain_lanes = [active_lane(i) for i in range(3)]
    weighted_lanes = [active_lane(i) for i in range(3)]
    plain = LeastOutstanding(rng=random.Random(5))
    weighted = Weighted(QUICK, rng=random.Random(5))
    for step in range(500):
        busy = step % 3
        plain_lanes[busy].in_flight = weighted_lanes[busy].in_flight = step % 4
        a, b = plain(plain_lanes), weighted(weighted_lanes)
        assert a.id == b.id
        a.last_picked = b.last_picked = step + 10


def test_sequential_calls_follow_the_weights() -> None:
    """One pod at 0.9 utilization, two at 0.3 (same qps): weights 1:3:3, after the blackout."""
    clock = FakeClock(0.0)
    lanes = [active_lane(i) for i in range(3)]
    pick = Weighted(QUICK, rng=random.Random(1), clock=clock)
    for lane, utilization in zip(lanes, (0.9, 0.3, 0.3), strict=True):
        pick.reported(lane, report(utilization), clock())
    before = sequential(pick, lanes, 1400)  # in the blackout: even
    assert max(before.values()) / min(before.values()) < 1.1, before
    clock.advance(2.0)
    for lane, utilization in zip(lanes, (0.9, 0.3, 0.3), strict=True):
        pick.reported(lane, report(utilization), clock())
    after = sequential(pick, lanes, 1400)
    assert after[0] / 1400 == pytest.approx(1 / 7, abs=0.03), after
    assert after[1] == pytest.approx(after[2], rel=0.1), after
    # Runs of sequential calls stay (few switches), as LeastOutstanding's.
    order = picked(pick, lanes, 700)
    assert sum(a != b for a, b in itertools.pairwise(order)) <= 700 / 16 * 1.5


def test_a_lane_new_since_the_last_update_keeps_its_first_report() -> None:
    clock = FakeClock(0.0)
    lanes = [active_lane(i) for i in range(2)]
    pick = Weighted(WeightConfig(blackout_s=0.0, update_s=5.0), rng=random.Random(1), clock=clock)
    for lane in lanes:
        pick.reported(lane, report(0.5), clock())
    pick(lanes)
    fresh = active_lane(2)
    pick.reported(fresh, report(0.5), clock())  # reported before the picker saw the lane
    for _ in range(20):
        pick([*lanes, fresh])
    assert fresh.load is not None and fresh.load.reports == 1


def test_calls_in_flight_count_against_the_weight() -> None:
    clock = FakeClock(0.0)
    lanes = [active_lane(i) for i in range(2)]
    pick = Weighted(QUICK, run=1, rng=random.Random(1), clock=clock)
    for lane in lanes:
        pick.reported(lane, report(0.5), clock())
    clock.advance(2.0)
    lanes[0].in_flight = 5
    assert all(pick(lanes) is lanes[1] for _ in range(3))


def test_a_lane_passed_over_for_its_calls_in_flight_gets_no_burst_after() -> None:
    """While a lane holds more calls than another, it takes none (join the shortest queue,
    in calls per weight); once its calls end it takes its turn again, not a burst of the
    calls it was passed over for, which would rebuild the queue it was spared."""
    clock = FakeClock(0.0)
    held, free = lanes = [active_lane(i) for i in range(2)]
    # Equal weights past the blackout, not updated again while the clock stands still.
    pick = Weighted(WeightConfig(blackout_s=1.0, update_s=5.0), run=1, clock=clock)
    for _ in range(2):
        for lane in lanes:
            pick.reported(lane, report(0.5), clock())
        clock.advance(2.0)
    held.in_flight = 5
    assert picked(pick, lanes, 30) == [free.id] * 30
    held.in_flight = 0
    after = picked(pick, lanes, 12)
    longest = max(len(list(run)) for lane, run in itertools.groupby(after) if lane == held.id)
    assert longest <= 1 and after.count(held.id) == 6, after


def test_a_lane_without_weight_gets_the_mean_and_one_weight_is_none() -> None:
    clock = FakeClock(0.0)
    lanes = [active_lane(i) for i in range(3)]
    pick = Weighted(QUICK, rng=random.Random(1), clock=clock)
    pick.reported(lanes[0], report(0.9), clock())
    clock.advance(2.0)
    # One weight alone: every lane the same (A58 falls back to round robin).
    alone = sequential(pick, lanes, 900)
    assert max(alone.values()) / min(alone.values()) < 1.1, alone
    pick.reported(lanes[1], report(0.3), clock())
    clock.advance(2.0)
    pick.reported(lanes[0], report(0.9), clock())
    pick.reported(lanes[1], report(0.3), clock())
    # Lane 2 reports nothing: the mean of 1 and 3, so 1:3:2.
    shares = sequential(pick, lanes, 1800)
    assert shares[0] / 1800 == pytest.approx(1 / 6, abs=0.03), shares
    assert shares[2] / 1800 == pytest.approx(2 / 6, abs=0.04), shares
    # Stale reports expire: even again.
    clock.advance(11.0)
    stale = sequential(pick, lanes, 900)
    assert max(stale.values()) / min(stale.values()) < 1.1, stale


def test_slow_start_ramps_a_joined_pod() -> None:
    clock = FakeClock(0.0)
    slow = SlowStart(window_s=10.0, aggression=1.0, min_weight_percent=10.0)
    assert slow.factor(0.0) == pytest.approx(0.1)
    assert slow.factor(5.0) == pytest.approx(0.5)
    assert slow.factor(10.0) == 1.0
    assert SlowStart(window_s=10.0, aggression=2.0).factor(2.5) == pytest.approx(0.5)
    lanes = [active_lane(i) for i in range(3)]
    lanes[2].joined_at = 0.0
    pick = Weighted(WeightConfig(update_s=0.0, slow_start=slow), clock=clock)
    clock.advance(2.0)  # factor 0.2: 1:1:0.2
    early = sequential(pick, lanes, 2200)
    assert early[2] / 2200 == pytest.approx(0.2 / 2.2, abs=0.03), early
    clock.advance(6.0)  # factor 0.8
    later = sequential(pick, lanes, 2800)
    assert later[2] / 2800 == pytest.approx(0.8 / 2.8, abs=0.04), later
    clock.advance(5.0)  # past the window: even
    done = sequential(pick, lanes, 1500)
    assert max(done.values()) / min(done.values()) < 1.1, done


def test_only_a_pod_that_joined_later_is_slow_started() -> None:
    """The pods found at start take full shares; a scale-up's pod found later is marked
    joined (its lane ramps), and a lane rotated onto a known pod is not."""
    clock = FakeClock()
    rng = random.Random(7)
    slow = SlowStart(window_s=30.0)
    picker = Weighted(WeightConfig(slow_start=slow, update_s=0.0), rng=rng, clock=clock)
    pool = LanePool(PoolConfig(), picker=picker, clock=clock, rng=rng)
    proxy = KubeProxy(3, rng)
    old = {"pod-0", "pod-1", "pod-2"}
    assert drive(pool, proxy, clock, lambda: set(active_pods(pool)) >= old, 10.0) is not None
    assert all(lane.joined_at is None for lane in pool.lanes)
    clock.advance(10.0)
    proxy.scale(4)
    assert drive(pool, proxy, clock, lambda: "pod-3" in active_pods(pool), 30.0) is not None
    (new,) = [lane for lane in pool.lanes if lane.pod == "pod-3" and lane.is_available()]
    assert new.joined_at is not None and clock.now - new.joined_at < 30.0
    assert all(lane.joined_at is None for lane in pool.lanes if lane.pod in old)
    # Its share ramps: sequential calls give it f / (3 + f) of them, f its slow-start factor.
    lanes = [lane for lane in pool.lanes if lane.is_available()]
    factor = slow.factor(clock.now - new.joined_at)
    shares = sequential(picker, lanes, 2000)
    assert shares[new.id] < 2000 * factor / (3 + factor) * 1.5, shares
    clock.advance(31.0)
    assert sequential(picker, lanes, 2000)[new.id] > 2000 / 4 * 0.8


def test_a_joined_pods_ramp_applies_from_its_first_calls_not_from_the_next_update() -> None:
    """With the default ``update_s`` (1 s) the weights are recomputed once a second: a pod that
    joins between two updates took a full share of the calls until the next one (hundreds of
    calls at a cold pod, which slow start is there to spare). Its lane's activation now has the
    next pick weigh the lanes."""
    clock = FakeClock()
    rng = random.Random(7)
    slow = SlowStart(window_s=30.0)
    picker = Weighted(WeightConfig(slow_start=slow), rng=rng, clock=clock)
    pool = LanePool(PoolConfig(), picker=picker, clock=clock, rng=rng)
    proxy = KubeProxy(3, rng)
    old = {"pod-0", "pod-1", "pod-2"}
    assert drive(pool, proxy, clock, lambda: set(active_pods(pool)) >= old, 10.0) is not None
    clock.advance(10.0)
    proxy.scale(4)
    # drive() calls before each round: the join is seen by no update before the picks below.
    assert drive(pool, proxy, clock, lambda: "pod-3" in active_pods(pool), 30.0) is not None
    (new,) = [lane for lane in pool.lanes if lane.pod == "pod-3" and lane.is_available()]
    assert new.joined_at is not None
    lanes = [lane for lane in pool.lanes if lane.is_available()]
    factor = slow.factor(clock.now - new.joined_at)  # 0.1, its floor, this soon
    shares = sequential(picker, lanes, 400)  # at the same instant: before any update is due
    assert shares[new.id] <= 400 * factor / (3 + factor) * 1.5 + 1, (factor, shares)


def test_peak_ewma_jumps_up_and_decays() -> None:
    load = LaneLoad()
    load.timed(0.010, 0.0, 10.0)
    assert load.ewma == pytest.approx(0.010)
    load.timed(0.050, 1.0, 10.0)  # a peak is taken at once
    assert load.ewma == pytest.approx(0.050)
    load.timed(0.010, 11.0, 10.0)  # one time constant later: 1/e of the way back
    assert load.ewma == pytest.approx(0.010 + 0.040 / 2.718281828, rel=1e-3)


def test_latency_weighs_only_without_reports_and_when_it_differs() -> None:
    clock = FakeClock(0.0)
    lanes = [active_lane(i) for i in range(3)]
    config = WeightConfig(update_s=0.0, peak_ewma_s=10.0)
    pick = Weighted(config, rng=random.Random(1), clock=clock)
    assert pick.times_calls and not Weighted().times_calls
    for lane, latency in zip(lanes, (0.001, 0.0012, 0.0009), strict=True):
        pick.timed(lane, latency, clock())
    even = sequential(pick, lanes, 900)  # within the spread: LeastOutstanding's even shares
    assert not pick.weighing and max(even.values()) / min(even.values()) < 1.1, even
    pick.timed(lanes[0], 0.005, clock())  # 5x slower
    slow = sequential(pick, lanes, 1100)
    assert pick.weighing and slow[0] / 1100 == pytest.approx(1 / 11, abs=0.03), slow
    # Hysteresis (fastest 0.9 ms): 1.6 ms (1.8x: below 2, above its root) keeps weighing;
    # 1.2 ms (1.33x) stops.
    pick.timed(lanes[0], 0.0016, clock.advance(1000.0))
    sequential(pick, lanes, 30)
    assert pick.weighing
    pick.timed(lanes[0], 0.0012, clock.advance(1000.0))
    sequential(pick, lanes, 30)
    assert not pick.weighing
    # Reports, once usable, take over from latencies.
    for lane in lanes:
        pick.reported(lane, report(0.5), clock())
    clock.advance(11.0)
    for lane in lanes:
        pick.reported(lane, report(0.5), clock())
    reported_even = sequential(pick, lanes, 900)
    assert max(reported_even.values()) / min(reported_even.values()) < 1.1, reported_even


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError):
        WeightConfig(blackout_s=-1)
    with pytest.raises(ConfigurationError):
        WeightConfig(peak_ewma_s=0)
    with pytest.raises(ConfigurationError):
        SlowStart(window_s=0)
    with pytest.raises(ConfigurationError):
        SlowStart(min_weight_percent=0)
