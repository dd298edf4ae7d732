"""Property tests: the header parser and the detector fed arbitrary input keep their promises.

Documented invariants checked here: ``pod_from_metadata`` returns an identity or None and raises
nothing but ``MalformedPodHeader``; ``PodReader`` never raises; the detector never raises, keeps
every share in [0, 1] summing to 1 whenever a call in the window named a pod, never knows more
than ``max_known_pods`` pods, holds at most ``window_calls`` calls, and only changes state with a
transition from one valid state to another (a stale one always to ``unverified``).
"""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityDetector,
    AffinityState,
    CallObserver,
    PodReader,
    PodReading,
)
from grpc_balance_mw.affinity.lanes import Lane
from grpc_balance_mw.errors import MalformedPodHeader
from grpc_balance_mw.identity import (
    IDENTITY_HEADERS,
    POD_HEADER,
    PodIdentity,
    pod_from_metadata,
)

FAST = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

keys = st.one_of(
    st.sampled_from([*IDENTITY_HEADERS, "server", "x-envoy-upstream-service-time"]),
    st.sampled_from([h.upper() for h in IDENTITY_HEADERS]),
    st.text(max_size=12),
)
values = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=12),
    st.sampled_from(["pod-a", "pod-b", "10.0.0.1", "::1", "envoy", " pod ", ""]),
)
metadata = st.one_of(
    st.none(),
    st.lists(st.tuples(keys, values), max_size=6),
    st.lists(st.tuples(keys, values), max_size=6).map(tuple),
)


@FAST
@given(metadata)
def test_pod_from_metadata_returns_an_identity_or_raises_malformed(md: Any) -> None:
    try:
        identity = pod_from_metadata(md)
    except MalformedPodHeader as error:
        assert error.header in IDENTITY_HEADERS
        return
    if identity is not None:
        assert isinstance(identity, PodIdentity)
        assert pod_from_metadata(identity.to_metadata()) == identity  # a round trip


@FAST
@given(st.lists(st.tuples(metadata, metadata), max_size=8))
def test_the_reader_never_raises_and_a_pod_is_never_malformed(
    responses: list[tuple[Any, Any]],
) -> None:
    observer = CallObserver(AffinityDetector("t", AffinityConfig(warmup_s=0)))
    reader = PodReader()
    for initial, trailing in responses:
        for reading in (reader.read(initial), observer.read_pod(initial, trailing)):
            assert isinstance(reading, PodReading)
            assert reading.pod is None or not reading.malformed
            if reading.pod is not None:
                assert pod_from_metadata([(POD_HEADER, reading.pod)]) is not None


CONFIGS = [
    AffinityConfig(
        window_calls=8, window_s=5, min_samples=3, dwell_calls=2, warmup_s=0, max_known_pods=4
    ),
    AffinityConfig(window_calls=50, min_samples=10, dwell_calls=3, warmup_s=1, max_known_pods=16),
]
pods = st.one_of(st.none(), st.sampled_from(["a", "b", "c"]), st.text(min_size=1, max_size=6))
durations = st.floats(allow_nan=True, allow_infinity=True)
call = st.tuples(
    st.sampled_from(["record", "count"]),
    pods,
    durations,
    st.booleans(),  # stream
    st.booleans(),  # l7
    st.booleans(),  # malformed
    st.floats(min_value=0, max_value=120, allow_nan=False),  # time since the previous step
    st.booleans(),  # warming
)
step = st.one_of(
    call,
    st.tuples(st.just("known"), st.lists(st.text(min_size=1, max_size=6), max_size=10)),
    st.tuples(st.just("dns"), st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2"]), max_size=3)),
    st.tuples(st.just("expected"), st.one_of(st.none(), st.integers(1, 5))),
    st.tuples(st.just("read")),
)


def _check(detector: AffinityDetector, now: float) -> None:
    config = detector.config
    snapshot = detector.snapshot(now=now)
    assert isinstance(snapshot.state, AffinityState)
    assert snapshot.calls <= config.window_calls
    assert len(snapshot.known_pods) <= config.max_known_pods
    assert 0.0 <= snapshot.top_share <= 1.0 and 0.0 <= detector.top_share <= 1.0
    shares = [share.share for share in snapshot.pods.values()]
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in shares)
    if snapshot.calls > snapshot.unknown_calls:
        assert math.isclose(math.fsum(shares), 1.0, rel_tol=1e-9)
    else:
        assert shares == []


def _transition_ok(transition: Any) -> None:
    if transition is not None:
        assert transition.previous is not transition.current
        assert not transition.stale or transition.current is AffinityState.UNVERIFIED


@FAST
@given(st.sampled_from(CONFIGS), st.lists(step, max_size=60))
def test_the_detector_keeps_its_invariants_whatever_it_is_fed(
    config: AffinityConfig, steps: list[tuple[Any, ...]]
) -> None:
    clock = [0.0]
    detector = AffinityDetector("t", config, clock=lambda: clock[0])
    for operation, *args in steps:
        if operation in ("record", "count"):
            pod, duration, stream, l7, malformed, pause, warming = args
            clock[0] += pause
            if operation == "record":
                _transition_ok(
                    detector.record(
                        pod,
                        duration_s=duration,
                        stream=stream,
                        l7=l7,
                        malformed=malformed,
                        now=clock[0],
                        warming=warming,
                    )
                )
            else:
                detector.count(pod, duration, stream, l7, malformed, clock[0], warming)
        elif operation == "known":
            detector.add_known_pods(args[0])
        elif operation == "dns":
            detector.set_dns_answer(args[0])
        elif operation == "expected":
            detector.expected_pods = args[0]
        else:
            _transition_ok(detector.expire())
        _check(detector, clock[0])


class _Counting(AffinityDetector):
    """The detector as it is, counting the calls it judged and the verdicts it worked out."""

    judged = worked_out = settled_by_flags = 0

    def _judge(self, now: float, lane: Any = None) -> Any:
        self.judged += 1
        settled = self._settled is not None and self._settled == self._settled_on(lane)
        self.settled_by_flags += settled and self._by_flags
        return super()._judge(now, lane)

    def _candidate(self, lane: Any) -> Any:
        self.worked_out += 1
        return super()._candidate(lane)


class _JudgesEveryCall(AffinityDetector):
    """The detector without its settled shortcut: every call's verdict worked out in full."""

    def _judge(self, now: float, lane: Any = None) -> Any:
        self._settled = None
        return super()._judge(now, lane)


_SETTLING = [
    *CONFIGS,
    AffinityConfig(window_calls=12, window_s=3, min_samples=4, dwell_calls=3, warmup_s=0),
]


def _random_steps(rng: random.Random, pods: list[str | None]) -> list[tuple[Any, ...]]:
    """Runs of calls (pod, lane, how many, gap in seconds, l7), with changes to the pods known
    between them: the shapes in which a verdict settles and then must move."""
    steps: list[tuple[Any, ...]] = []
    for _ in range(rng.randint(1, 25)):
        roll = rng.random()
        if roll < 0.08:
            steps.append(("expected", rng.choice([None, 1, 2, 3, 5])))
        elif roll < 0.14:
            steps.append(("known", rng.sample("abcde", rng.randint(0, 3))))
        elif roll < 0.18:
            steps.append(("dns", rng.sample(["10.0.0.1", "10.0.0.2"], rng.randint(0, 2))))
        elif roll < 0.35:  # one lane switching pods call after call: balanced per request
            cycle = rng.sample("abcd", rng.randint(2, 4))
            steps.append(("switch", cycle, rng.randint(0, 3), rng.randint(5, 80), 0.01, False))
        else:
            pod = rng.choice(pods)
            lane = rng.randint(0, 3)
            gap = rng.choice([0.001, 0.01, 0.01, 0.5, 7.0])
            steps.append(("run", pod, lane, rng.randint(1, 60), gap, rng.random() < 0.1))
    return steps


@pytest.mark.parametrize("seed", range(100))
def test_a_settled_verdict_is_the_verdict_judging_in_full_would_give(seed: int) -> None:
    """The detector skips working out the verdict while nothing it reads has changed since the
    last call that stayed in its state; fed the same calls, it moves exactly when a detector
    that judges every call in full does, at the same call, to the same state, with the same
    top share for the gauge."""
    _replay(seed)


def test_verdicts_from_per_request_balancing_settle_too() -> None:
    """A lane balanced per request settles on what its verdict reads (the share of per-request
    calls), not on pod shares that change with every call: the shortcut is taken there too."""
    assert sum(_replay(seed).settled_by_flags for seed in range(8)) > 100


def _replay(seed: int) -> _Counting:
    """Feed one seed's random calls to a detector and to one that judges every call in full;
    assert they agree throughout; the first, with its counts of what it skipped."""
    rng = random.Random(seed)
    config = _SETTLING[seed % len(_SETTLING)]
    clock = [0.0]
    # A literal address is one address; a name has as many as its DNS answer gives.
    target = "10.0.0.1:80" if seed % 3 else "charge-points.ev.svc:50051"
    fast = _Counting(target, config, clock=lambda: clock[0])
    full = _JudgesEveryCall(target, config, clock=lambda: clock[0])
    both = (fast, full)
    lanes = {id(d): [Lane(f"lane-{i}") for i in range(4)] for d in both}
    moves: dict[int, list[tuple[int, str, str]]] = {id(d): [] for d in both}
    calls = 0
    # Half the runs see one pod only, so that what the pods known say decides the verdict.
    pods: list[str | None] = ["a", "a", None] if seed % 2 else [None, "a", "a", "b", "c", "d"]
    for _ in range(20):
        for operation, *args in _random_steps(rng, pods):
            if operation == "expected":
                fast.expected_pods = full.expected_pods = args[0]
            elif operation == "known":
                for detector in both:
                    detector.add_known_pods(args[0], now=clock[0])
            elif operation == "dns":
                for detector in both:
                    detector.set_dns_answer(args[0])
            else:
                pod, lane, times, gap, l7 = args
                for index in range(times):
                    clock[0] += gap
                    calls += 1
                    served = pod[index % len(pod)] if operation == "switch" else pod
                    for detector in both:
                        on = lanes[id(detector)][lane]
                        transition = detector.record(served, l7=l7, now=clock[0], lane=on)
                        if transition is not None:
                            moves[id(detector)].append(
                                (calls, transition.previous.value, transition.current.value)
                            )
                    assert fast.top_share == full.top_share
    assert moves[id(fast)] == moves[id(full)]
    assert fast.snapshot(now=clock[0]) == full.snapshot(now=clock[0])
    assert fast.worked_out < fast.judged  # the shortcut was taken
    return fast
