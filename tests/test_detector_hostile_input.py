"""The affinity core against servers that misbehave and time that passes, without sockets:
known pods bounded by count, stale windows, contradicting metadata, absurd durations."""

from __future__ import annotations

import math
import sys

import pytest

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityState,
    CallObserver,
    PodReader,
)
from grpc_balance_mw.affinity.detector import MAX_STREAM_WEIGHT
from grpc_balance_mw.affinity.observer import READINGS_CACHED, PodReading, merge_readings
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import POD_HEADER

CFG = AffinityConfig(window_calls=100, window_s=60, min_samples=20, dwell_calls=5, warmup_s=0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.slow
def test_a_server_that_names_a_new_pod_per_call_cannot_grow_the_known_pods() -> None:
    clock = FakeClock()
    config = AffinityConfig(max_known_pods=64, warmup_s=0)
    detector = AffinityDetector("t", config, clock=clock)
    observer = CallObserver(detector, clock=clock)
    for i in range(20_000):
        clock.now += 0.001
        observer.count(clock.now, False, ((POD_HEADER, f"made-up-{i}"),), None)
    snapshot = detector.snapshot()
    assert len(snapshot.known_pods) <= 64 and snapshot.known_count <= 64
    assert snapshot.known_pods_dropped == 20_000 - len(snapshot.known_pods)
    assert "made-up-19999" in snapshot.known_pods  # the newest stays
    assert len(observer.reader.by_metadata) <= READINGS_CACHED  # the header cache is bounded too
    assert sys.getsizeof(detector._known) < 64 * 1024  # a dict of at most 65 pods


def test_the_bound_is_not_hit_by_a_real_deployment() -> None:
    detector = AffinityDetector("t", CFG)
    detector.expected_pods = 3
    for i in range(300):
        detector.record(f"pod-{i % 200}", now=float(i))
    snapshot = detector.snapshot(now=300.0)
    assert snapshot.known_pods_dropped == 0 and len(snapshot.known_pods) == 200


def test_probe_pods_are_bounded_too() -> None:
    detector = AffinityDetector("t", AffinityConfig(max_known_pods=8))
    detector.add_known_pods([f"p{i}" for i in range(100)], now=1.0)
    snapshot = detector.snapshot(now=1.0)
    assert len(snapshot.known_pods) <= 8 and snapshot.known_pods_dropped >= 92


@pytest.mark.parametrize("bound", [0, 1, -5])
def test_max_known_pods_needs_two(bound: int) -> None:
    with pytest.raises(ConfigurationError):
        AffinityConfig(max_known_pods=bound)


def _pinned(clock: FakeClock) -> AffinityDetector:
    detector = AffinityDetector("t", CFG, clock=clock)
    detector.expected_pods = 3
    for _ in range(40):
        clock.now += 0.01
        detector.record("a")
    assert detector.state is AffinityState.PINNED and detector.top_share == 1.0
    return detector


def test_a_window_that_aged_out_returns_to_unverified_once() -> None:
    clock = FakeClock()
    detector = _pinned(clock)
    clock.now += CFG.window_s + 1  # calls stopped an hour ago, or a minute
    transition = detector.expire()
    assert transition is not None and transition.stale
    assert (transition.previous, transition.current) == (
        AffinityState.PINNED,
        AffinityState.UNVERIFIED,
    )
    assert transition.snapshot.calls == 0
    assert detector.state is AffinityState.UNVERIFIED and detector.top_share == 0.0
    assert detector.expire() is None  # reported once


def test_a_stale_window_found_by_a_reader_is_reported_by_the_next_call() -> None:
    clock = FakeClock()
    detector = _pinned(clock)
    clock.now += 3600
    assert detector.state is AffinityState.UNVERIFIED  # a reader sees it at once
    clock.now += 0.01
    transition = detector.record("a")
    assert transition is not None and transition.stale


def test_the_first_call_after_a_long_pause_ends_the_old_state() -> None:
    clock = FakeClock()
    detector = _pinned(clock)
    clock.now += 3600
    transition = detector.record("a")  # nothing read the detector in between
    assert transition is not None and transition.stale
    assert detector.state is AffinityState.UNVERIFIED


def test_calls_that_stop_being_identified_make_the_window_stale() -> None:
    clock = FakeClock()
    detector = _pinned(clock)
    entered = []
    for _ in range(CFG.window_calls):
        clock.now += 0.01
        transition = detector.record(None)
        if transition is not None:
            entered.append((transition.current, transition.stale))
    assert entered == [(AffinityState.UNVERIFIED, True)]
    assert detector.top_share == 0.0


def _reading(pod: str | None, malformed: bool = False) -> PodReading:
    return PodReading(pod, False, malformed)


@pytest.mark.parametrize(
    ("headers", "trailers", "merged"),
    [
        (_reading("a"), _reading("a"), _reading("a")),
        (_reading("a"), _reading(None), _reading("a")),
        (_reading(None), _reading("b"), _reading("b")),
        (_reading("a"), _reading("b"), _reading(None, True)),  # they contradict: malformed
        (_reading("a"), _reading(None, True), _reading(None, True)),
        (_reading(None, True), _reading("b"), _reading(None, True)),
    ],
)
def test_headers_and_trailers_that_disagree_are_malformed(
    headers: PodReading, trailers: PodReading, merged: PodReading
) -> None:
    assert merge_readings(headers, trailers) == merged


def test_a_call_whose_trailers_name_another_pod_counts_as_malformed() -> None:
    detector = AffinityDetector("t", CFG)
    observer = CallObserver(detector)
    observer.count(0.0, False, ((POD_HEADER, "pod-a"),), ((POD_HEADER, "pod-b"),))
    observer.count(0.0, False, ((POD_HEADER, "pod-a"),), lambda: ((POD_HEADER, "pod-a"),))
    snapshot = detector.snapshot()
    assert (snapshot.calls, snapshot.unknown_calls, snapshot.malformed_calls) == (2, 1, 1)
    assert set(snapshot.pods) == {"pod-a"}
    assert PodReader().read(((POD_HEADER, "pod-a"),)).pod == "pod-a"


@pytest.mark.parametrize("duration", [math.inf, -math.inf, math.nan, 1e300, -1.0])
def test_absurd_stream_durations_keep_shares_finite(duration: float) -> None:
    detector = AffinityDetector("t", CFG)
    detector.record("a", duration_s=duration, stream=True, now=1.0)
    detector.record("b", duration_s=2.0, stream=True, now=1.0)
    snapshot = detector.snapshot(now=1.0)
    shares = [share.share for share in snapshot.pods.values()]
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in shares)
    assert math.fsum(shares) == pytest.approx(1.0)
    assert snapshot.pods["a"].weight <= MAX_STREAM_WEIGHT
