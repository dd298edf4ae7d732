"""The membership model (pure core): pods leave on evidence, hints yield to it."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from grpc_balance_mw._membership import Membership, Source, misses_to_forget
from grpc_balance_mw.pool import CheckResult, LanePool, Plan, PoolConfig
from grpc_balance_mw.pool.lane import LaneState


@pytest.mark.parametrize(("known", "k"), [(2, 10), (3, 18), (4, 25), (8, 52)])
def test_misses_to_forget_is_the_smallest_k_below_the_confidence(known: int, k: int) -> None:
    p = (known - 1) / known
    assert misses_to_forget(known) == k
    assert p**k < 1e-3 <= p ** (k - 1)
    assert misses_to_forget(known, 1e-6) > k


def four_pods(model: Membership, now: float = 0.0) -> None:
    for pod in ("a", "b", "c", "d"):
        model.fresh(pod, Source.SCOUT, now)


def test_a_pod_that_fresh_connections_keep_missing_is_dropped_after_k() -> None:
    model = Membership()
    four_pods(model)
    need = misses_to_forget(4)
    for i in range(need - 1):
        model.fresh("abc"[i % 3], Source.SCOUT, 1.0)
    assert model.count(1.0) == 4  # one miss short: still there
    model.fresh("a", Source.SCOUT, 1.0)
    assert sorted(model.live()) == ["a", "b", "c"] and model.count(1.0) == 3
    assert model.dropped[-1][0] == "d" and "missed it" in model.dropped[-1][1]


def test_a_check_that_names_the_pod_resets_its_misses() -> None:
    model = Membership()
    four_pods(model)
    for i in range(misses_to_forget(4) - 1):
        model.fresh("abc"[i % 3], Source.SCOUT, 1.0)
    model.confirmed("d", Source.CHECK, 1.5)
    for i in range(misses_to_forget(4) - 1):
        model.fresh("abc"[i % 3], Source.SCOUT, 2.0)
    assert "d" in model.live()


def test_a_pod_an_open_connection_holds_counts_no_misses() -> None:
    model = Membership()
    four_pods(model)
    for i in range(100):
        model.fresh("abc"[i % 3], Source.SCOUT, 1.0, held={"d"})
    assert model.count(1.0) == 4


def test_connections_that_all_reach_one_pod_say_nothing_of_the_others() -> None:
    """Service sessionAffinity: ClientIP sends every fresh connection to one pod."""
    model = Membership()
    four_pods(model)
    for _ in range(200):
        model.fresh("a", Source.SCOUT, 1.0)
    assert model.count(1.0) == 4


def test_gone_evidence_stops_counting_at_once_and_finding_it_again_counts_it() -> None:
    model = Membership(forget_gone_s=30)
    four_pods(model)
    assert model.gone("d", "not serving", 1.0)
    assert model.count(1.0) == 3 and model.down() == {"d"} and model.knows("d")
    assert model.fresh("d", Source.SCOUT, 2.0)  # back: a change
    assert model.count(2.0) == 4 and not model.down()
    model.gone("d", "not serving", 3.0)
    assert model.count(40.0) == 3 and not model.knows("d")  # forgotten after forget_gone_s


def test_time_alone_drops_no_pod() -> None:
    model = Membership()
    four_pods(model)
    assert model.count(86_400.0) == 4


def test_a_larger_hint_holds_until_fresh_connections_contradict_it() -> None:
    model = Membership(hint_patience_s=10)
    model.expect(4)
    for pod in "abc":
        model.fresh(pod, Source.SCOUT, 0.0)
    assert model.count(0.0) == 4
    # (3/4) ** m < 1e-3 needs m = 25 fresh connections that found no 4th pod.
    for i in range(25):
        model.fresh("abc"[i % 3], Source.SCOUT, 1.0)
    assert model.count(1.0) == 4  # contradicted, but not yet for hint_patience_s
    assert not model.take_notices()
    assert model.count(11.0) == 3
    (notice,) = model.take_notices()
    assert "expected_pods=4" in notice and "probably scaled" in notice
    assert model.count(20.0) == 3 and not model.take_notices()  # said once


def test_a_hint_below_the_pods_found_is_overruled_too() -> None:
    model = Membership(hint_patience_s=5)
    model.expect(2)
    four_pods(model)
    assert model.count(0.0) == 4
    model.count(6.0)
    assert "found 4 pods" in model.take_notices()[0]


def test_a_hint_consistent_with_the_evidence_is_never_overruled() -> None:
    model = Membership(hint_patience_s=0)
    model.expect(4)
    four_pods(model)
    for i in range(500):
        model.fresh("abcd"[i % 4], Source.SCOUT, 1.0)
    assert model.count(100.0) == 4 and not model.take_notices()


def test_the_detectors_count_yields_to_evidence_without_a_warning() -> None:
    model = Membership(hint_patience_s=30)
    four_pods(model)
    model.called(4)
    model.gone("d", "its calls failed UNAVAILABLE", 1.0)
    for i in range(25):
        model.fresh("abc"[i % 3], Source.SCOUT, 1.0)
    assert model.count(1.0) == 3 and not model.take_notices()


def test_a_pod_still_there_is_dropped_about_as_rarely_as_the_confidence_says() -> None:
    """Simulated runs: a run of k misses from scratch, 4 pods, uniform picks."""
    rng = random.Random(7)
    k, dropped = misses_to_forget(4), 0
    runs = 20_000
    for _ in range(runs):
        dropped += all(rng.randrange(4) != 3 for _ in range(k))
    assert dropped / runs < 3e-3
    assert math.isclose(0.75**k, 7.5e-4, rel_tol=0.01)


# -- the pool sized by the model ----------------------------------------------------------------


_turn = itertools.count()


def drive(pool: LanePool, pods: list[str], now: float) -> Plan:
    """One plan: each new lane reaches the next of ``pods`` (round robin, as a Service's random
    pick averages out); an active lane's check names its own pod."""
    plan = pool.plan(now)
    for lane in plan.dial:
        lane.connection = object()
        pool.checked(lane, CheckResult(True, pods[next(_turn) % len(pods)]), now)
    for lane in plan.check:
        pool.checked(lane, CheckResult(True, lane.pod), now)
    for lane in pool.confirmations():  # a pod never seen is believed once named twice
        pool.checked(lane, CheckResult(True, lane.claimed), now)
    return plan


def active_pods(pool: LanePool) -> list[str]:
    return sorted(lane.pod or "" for lane in pool.lanes if lane.state is LaneState.ACTIVE)


def test_after_a_scale_down_the_pool_drains_the_lane_on_a_doubled_pod() -> None:
    pool = LanePool(PoolConfig(scout_interval_s=0.25, health_interval_s=5.0))
    now = 0.0
    while now < 3.0:
        drive(pool, ["a", "b", "c", "d"], now)
        now += 0.25
    assert active_pods(pool) == ["a", "b", "c", "d"]
    # Pod d leaves; its lane reconnects to c (its check says so); scouts reach a, b, c only.
    for lane in pool.lanes:
        if lane.pod == "d":
            pool.checked(lane, CheckResult(True, "c"), now)
    end = now + 10.0
    while now < end and active_pods(pool) != ["a", "b", "c"]:
        drive(pool, ["a", "b", "c"], now)
        now += 0.25
    assert active_pods(pool) == ["a", "b", "c"]


def test_a_stale_expected_pods_yields_with_one_warning_and_the_lanes_follow() -> None:
    """expected_pods=4 while 3 pods exist (the Deployment was scaled): the pool keeps a 4th lane
    (doubling a pod) only until fresh connections contradict the hint for hint_patience_s."""
    pool = LanePool(PoolConfig(expected_pods=4))
    notices: list[str] = []
    now = 0.0
    while now < 40.0:
        notices += drive(pool, ["a", "b", "c"], now).notices
        if pool.lanes:
            pool.release(pool.acquire())  # a channel in use: scouts at the fast pace
        now += 0.25
    (notice,) = notices
    assert "expected_pods=4" in notice and "probably scaled" in notice
    assert active_pods(pool) == ["a", "b", "c"]


def test_complete_when_fresh_connections_make_one_more_pod_unlikely() -> None:
    model = Membership()
    for pod in "ab":
        model.fresh(pod, Source.SCOUT, 0.0)
    k = misses_to_forget(3)  # (2/3) ** k < 1e-3 if a third pod existed
    for i in range(k - 1):
        model.fresh("ab"[i % 2], Source.SCOUT, 1.0)
    assert not model.complete()
    model.fresh("a", Source.SCOUT, 1.0)
    assert model.complete()
    model.fresh("c", Source.SCOUT, 2.0)  # a new pod: the run starts again
    assert not model.complete()
