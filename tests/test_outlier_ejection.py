"""Outlier ejection (gRFC A50 + consecutive failures), pure: the ejector with a fake clock, and
the lane pool skipping an ejected pod's lanes. The real gray-failure run is test_gray_failure.py.
"""

from __future__ import annotations

import logging
import random

import grpc
import pytest
from pool_fakes import FakeClock, scripted, settle

from grpc_balance_mw._routing import Outcome, outcome_of
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool import (
    LanePool,
    OutlierDetection,
    OutlierEjector,
    PoolConfig,
    rotate_never,
)

PODS = ("pod-0", "pod-1", "pod-2")


def ejector(**overrides: object) -> OutlierEjector:
    return OutlierEjector(OutlierDetection(**overrides))  # type: ignore[arg-type]


def healthy(calls: int = 100, *pods: str) -> dict[str, tuple[int, int]]:
    return {pod: (calls, 0) for pod in pods}


# -- the algorithms ------------------------------------------------------------------------------


def test_failure_percentage_ejects_the_pod_that_fails_and_only_it() -> None:
    outliers = ejector(success_rate_stdev_factor=None)
    outliers.sweep(10.0, {**healthy(100, "pod-0", "pod-1"), "pod-2": (10, 90)})
    assert outliers.ejected == {"pod-2"}
    [event] = outliers.take_events()
    assert event.ejected and event.endpoint == "pod-2" and event.duration_s == 30.0
    assert event.level == logging.WARNING and "failure percentage 90 %" in event.message


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ((20, 80), "below the threshold (85 %)"),
        ((1, 40), "below the request volume (50 calls)"),
    ],
)
def test_failure_percentage_spares_a_pod_under_its_bounds(bad: tuple[int, int], why: str) -> None:
    outliers = ejector(success_rate_stdev_factor=None)
    outliers.sweep(10.0, {**healthy(100, "pod-0", "pod-1"), "pod-2": bad})
    assert outliers.ejected == set(), why


def test_failure_percentage_needs_its_minimum_hosts() -> None:
    outliers = ejector(success_rate_stdev_factor=None, failure_percentage_minimum_hosts=4)
    outliers.sweep(10.0, {**healthy(100, "pod-0", "pod-1"), "pod-2": (0, 100)})
    assert outliers.ejected == set()


def test_no_ejection_when_every_pod_fails_alike() -> None:
    """A shared fault (a database every pod uses): ejecting one would move no call anywhere
    better."""
    outliers = ejector()
    outliers.sweep(10.0, {pod: (0, 100) for pod in PODS})
    assert outliers.ejected == set()


def test_success_rate_ejects_a_statistical_outlier() -> None:
    pods = {f"pod-{i}": (198, 2) for i in range(5)}
    pods["pod-5"] = (140, 60)  # 70 %: far below the others' 99 %, far from 85 % failed
    outliers = ejector(failure_percentage_threshold=None)
    outliers.sweep(10.0, pods)
    assert outliers.ejected == {"pod-5"}
    assert "success rate 70 %" in outliers.take_events()[0].reason


def test_success_rate_needs_its_minimum_hosts_and_volume() -> None:
    pods = {f"pod-{i}": (198, 2) for i in range(4)}
    pods["pod-4"] = (140, 60)
    outliers = ejector(failure_percentage_threshold=None)
    outliers.sweep(10.0, pods)  # 5 hosts with volume: judged
    assert outliers.ejected == {"pod-4"}
    outliers = ejector(failure_percentage_threshold=None)
    outliers.sweep(10.0, {**pods, "pod-0": (50, 0)})  # one below the volume: 4, not judged
    assert outliers.ejected == set()


def test_consecutive_failures_eject_at_once_while_other_lanes_answer() -> None:
    outliers = ejector()
    assert not outliers.failed_in_row("pod-2", 4, True, 3, 1.0)
    assert not outliers.failed_in_row("pod-2", 5, False, 3, 1.0), "no other lane answered"
    assert not outliers.failed_in_row("pod-2", 5, True, 1, 1.0), "a lone pod"
    assert outliers.failed_in_row("pod-2", 5, True, 3, 1.0)
    assert outliers.ejected == {"pod-2"}
    assert outliers.take_events()[0].reason == "5 failures in a row"


def test_max_ejection_percent_follows_a50_the_first_is_always_allowed() -> None:
    """A50 stops once the share ejected is greater than the maximum: with 3 pods and 10 %, the
    first ejection (0 % ejected) goes ahead, the second (33 % ejected) does not."""
    outliers = ejector(success_rate_stdev_factor=None)
    counts = {"pod-0": (100, 0), "pod-1": (0, 100), "pod-2": (0, 100)}
    outliers.sweep(10.0, counts)
    assert outliers.ejected == {"pod-1"}
    assert not outliers.failed_in_row("pod-2", 50, True, 3, 11.0)
    # With 20 pods and 10 %, a third ejection is still allowed (2/20 = 10 % is not above 10 %).
    many = ejector(success_rate_stdev_factor=None)
    counts = {f"pod-{i:02}": (100, 0) for i in range(20)}
    counts.update({f"pod-{i:02}": (0, 100) for i in range(4)})
    many.sweep(10.0, counts)
    assert many.ejected == {"pod-00", "pod-01", "pod-02"}


def test_ejection_time_grows_with_repeats_is_capped_and_the_multiplier_decays() -> None:
    clock = FakeClock(0.0)
    outliers = ejector(interval_s=10.0, base_ejection_s=30.0, max_ejection_s=70.0)
    durations = []
    for _ in range(4):  # ejected again as soon as it returns
        assert outliers.failed_in_row("pod-2", 5, True, 3, clock.now)
        durations.append(outliers.take_events()[0].duration_s)
        while outliers.ejected:
            clock.advance(10.0)
            outliers.sweep(clock.now, healthy(100, *PODS))
        [returned] = outliers.take_events()
        assert not returned.ejected and returned.level == logging.INFO
    assert durations == [30.0, 60.0, 70.0, 70.0]  # base x times ejected, at most 70 s
    # Not ejected, the multiplier drops by one per sweep: after 4 quiet sweeps, 30 s again.
    for _ in range(4):
        clock.advance(10.0)
        outliers.sweep(clock.now, healthy(100, *PODS))
    assert outliers.failed_in_row("pod-2", 5, True, 3, clock.now)
    assert outliers.take_events()[0].duration_s == 30.0


def test_a_pod_returns_once_its_time_is_up_not_before() -> None:
    outliers = ejector(interval_s=10.0, base_ejection_s=30.0)
    assert outliers.failed_in_row("pod-2", 5, True, 3, 5.0)
    outliers.take_events()
    for now in (15.0, 25.0):
        outliers.sweep(now, healthy(100, *PODS))
        assert outliers.ejected == {"pod-2"}
    outliers.sweep(35.0, healthy(100, *PODS))
    assert outliers.ejected == set()
    assert [event.ejected for event in outliers.take_events()] == [False]


def test_due_every_interval() -> None:
    outliers = ejector(interval_s=10.0)
    assert not outliers.due(0.0)  # starts the interval
    assert not outliers.due(9.9)
    assert outliers.due(10.0)
    outliers.sweep(10.0, {})
    assert not outliers.due(19.0) and outliers.due(20.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"interval_s": 0},
        {"base_ejection_s": -1},
        {"max_ejection_percent": 101},
        {"failure_percentage_threshold": 120},
        {"consecutive_failures": 0},
        {"success_rate_stdev_factor": -0.5},
        {"success_rate_minimum_hosts": 0},
    ],
)
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        OutlierDetection(**bad)  # type: ignore[arg-type]


# -- which outcomes count -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "counts"),
    [
        (grpc.StatusCode.INTERNAL, True),
        (grpc.StatusCode.UNKNOWN, True),
        (grpc.StatusCode.DATA_LOSS, True),
        (grpc.StatusCode.CANCELLED, False),
        (grpc.StatusCode.NOT_FOUND, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False),  # judged by the pool: timed_out
    ],
)
def test_which_statuses_count_against_a_pod(code: grpc.StatusCode, counts: bool) -> None:
    assert outcome_of(code).pod_failed is counts


def test_unavailable_counts_only_when_the_pod_sent_it() -> None:
    assert Outcome(grpc.StatusCode.UNAVAILABLE, pod_named=True).pod_failed
    assert not Outcome(grpc.StatusCode.UNAVAILABLE, pod_named=False).pod_failed  # pod gone


# -- the pool: picks skip ejected pods -----------------------------------------------------------


def pool_of_three(detection: OutlierDetection | None = None) -> tuple[LanePool, FakeClock]:
    clock = FakeClock()
    config = PoolConfig(
        scout_interval_s=None,
        outlier_detection=detection if detection is not None else OutlierDetection(),
    )
    pool = LanePool(config, rotation=rotate_never(), clock=clock, rng=random.Random(1))
    settle(pool, scripted(PODS))
    assert sorted(lane.pod or "" for lane in pool.lanes) == list(PODS)
    return pool, clock


def calls(pool: LanePool, count: int, failing: str | None = None) -> dict[str, int]:
    """``count`` sequential calls; those on ``failing``'s lane fail INTERNAL."""
    seen: dict[str, int] = {}
    for _ in range(count):
        lane = pool.acquire()
        pod = lane.pod or ""
        seen[pod] = seen.get(pod, 0) + 1
        pool.release(lane, failed=pod == failing)
    return seen


def test_the_pool_ejects_a_failing_pod_at_once_and_its_lanes_get_no_calls() -> None:
    pool, clock = pool_of_three()
    first = calls(pool, 300, failing="pod-2")
    assert first["pod-2"] == 5, first  # five in a row, then ejected
    assert pool.outliers is not None and pool.outliers.ejected == {"pod-2"}
    assert "pod-2" not in calls(pool, 300, failing="pod-2")
    plan = pool.plan()
    assert [(event.endpoint, event.ejected) for event in plan.outliers] == [("pod-2", True)]
    # Back after 30 s (the next sweep after it): it gets calls again, and fails them again.
    for _ in range(4):
        clock.advance(10.0)
        settle(pool, scripted(PODS))
    assert pool.outliers.ejected == set()
    again = calls(pool, 300, failing="pod-2")
    assert again["pod-2"] == 5 and pool.outliers.ejected == {"pod-2"}
    assert pool.outliers.ejections == 2


def test_every_lane_ejected_still_takes_calls() -> None:
    detection = OutlierDetection(max_ejection_percent=100, consecutive_failures=1)
    pool, _ = pool_of_three(detection)
    for pod in PODS:
        assert pool.outliers is not None
        pool.outliers.failed_in_row(pod, 1, True, 3, 0.0)
    assert set(calls(pool, 60)) == set(PODS)


def test_healthy_pods_are_never_ejected_and_application_errors_do_not_count() -> None:
    pool, clock = pool_of_three()
    for _ in range(20):  # 20 sweeps of 10 s, 600 calls each
        for _ in range(600):
            lane = pool.acquire()
            pool.release(lane)  # OK, or NOT_FOUND/CANCELLED: the routing core passes no flag
        clock.advance(10.0)
        settle(pool, scripted(PODS))
    assert pool.outliers is not None
    assert pool.outliers.ejections == 0


def test_off_when_asked() -> None:
    clock = FakeClock()
    pool = LanePool(PoolConfig(scout_interval_s=None, outlier_detection=None), clock=clock)
    settle(pool, scripted(PODS))
    assert pool.outliers is None
    assert calls(pool, 300, failing="pod-2")["pod-2"] > 50
