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
from grpc_balance_mw.affinity.lanes import LaneEvidence
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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _change_facts(
    detectors: tuple[AffinityDetector, ...], operation: str, args: list[Any], now: float
) -> bool:
    """Apply a step that changes what the detectors know of the pods (expected, known, DNS)
    to each of them; False for a step of calls."""
    for detector in detectors:
        if operation == "expected":
            detector.expected_pods = args[0]
        elif operation == "known":
            detector.add_known_pods(args[0], now=now)
        elif operation == "dns":
            detector.set_dns_answer(args[0])
        else:
            return False
    return True


# The sweep is slow; the fast tier keeps its first seeds.
@pytest.mark.parametrize(
    "seed", [*range(3), *(pytest.param(s, marks=pytest.mark.slow) for s in range(3, 100))]
)
def test_a_settled_verdict_is_the_verdict_judging_in_full_would_give(seed: int) -> None:
    """The detector skips working out the verdict while nothing it reads has changed since the
    last call that stayed in its state; fed the same calls, it moves exactly when a detector
    that judges every call in full does, at the same call, to the same state, with the same
    top share for the gauge."""
    _replay(seed)


@pytest.mark.slow
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
    lanes = {id(d): [LaneEvidence(f"lane-{i}") for i in range(4)] for d in both}
    moves: dict[int, list[tuple[int, str, str]]] = {id(d): [] for d in both}
    calls = 0
    # Half the runs see one pod only, so that what the pods known say decides the verdict.
    pods: list[str | None] = ["a", "a", None] if seed % 2 else [None, "a", "a", "b", "c", "d"]
    for _ in range(20):
        for operation, *args in _random_steps(rng, pods):
            if not _change_facts(both, operation, args, clock[0]):
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


class _Moves(AffinityDetector):
    """A detector that notes each transition a call causes: (when the call ended, from, to)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moves: list[tuple[float, str, str]] = []
        self.like_calls = 0

    def _add(self, *call: Any) -> Any:
        transition = super()._add(*call)
        if transition is not None:
            self.moves.append((call[5], transition.previous.value, transition.current.value))
        return transition

    def _take_like_calls(self, first: Any) -> None:
        waiting = len(self.waiting)
        super()._take_like_calls(first)
        self.like_calls += waiting - len(self.waiting)


class _MovesJudgingEveryCall(_Moves, _JudgesEveryCall):
    """Notes its transitions, and works every call's verdict out in full."""


_BATCHED = [
    *_SETTLING,
    # Pods known go stale within seconds, so pruning them falls inside batches.
    AffinityConfig(
        window_calls=12,
        window_s=3,
        min_samples=4,
        dwell_calls=2,
        warmup_s=0.05,
        known_pods_ttl_s=2,
    ),
]


def _batched_steps(rng: random.Random, pods: list[str | None], config: AffinityConfig) -> Any:
    """``_random_steps``, and runs that age the window out call by call: a burst that fills it,
    then like calls spaced so that its oldest calls leave one or a few at a time."""
    steps = _random_steps(rng, pods)
    for _ in range(rng.randint(0, 3)):
        pod, lane = rng.choice(pods), rng.randint(0, 3)
        spacing = config.window_s / config.window_calls * rng.uniform(0.5, 4.0)
        at = rng.randrange(len(steps) + 1)
        if rng.random() < 0.5:  # the oldest call like those to come, the rest not
            others = [p for p in "abcd" if p != pod]
            burst = [
                ("run", pod, lane, 1, 0.001, False),
                ("switch", others, (lane + 1) % 4, config.window_calls - 1, 0.001, False),
            ]
        else:
            burst = [("run", pod, lane, config.window_calls, 0.001, False)]
        steps[at:at] = [*burst, ("run", pod, lane, rng.randint(5, 60), spacing, False)]
    return steps


def _replay_batched(seed: int) -> _Moves:
    """Feed one seed's random calls through ``count_as`` (judged in batches: by readers at
    random moments, and whenever ``JUDGE_EVERY_CALLS`` wait) and through ``record`` to a
    detector that judges every call in full on arrival; assert they agree throughout."""
    rng = random.Random(1000 + seed)
    config = rng.choice(_BATCHED)
    clock = [0.0]
    target = rng.choice(["10.0.0.1:80", "charge-points.ev.svc:50051"])
    batched = _Moves(target, config, clock=lambda: clock[0])
    full = _MovesJudgingEveryCall(target, config, clock=lambda: clock[0])
    both = (batched, full)
    lanes = {id(d): [LaneEvidence(f"lane-{i}") for i in range(4)] for d in both}
    pods: list[str | None] = rng.choice([["a", "a", None], [None, "a", "a", "b", "c", "d"]])
    until_read = rng.randint(1, 80)
    # As an observer counts (``count_as``): one tuple for every call like another, so that
    # like calls are told by identity; and as ``count`` does, a tuple of its own per call.
    shared: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for _ in range(20):
        for operation, *args in _batched_steps(rng, pods, config):
            if not _change_facts(both, operation, args, clock[0]):
                pod, lane, times, gap, l7 = args
                stream = rng.random() < 0.15
                for index in range(times):
                    clock[0] += gap
                    # Threads take the time, then queue: a call may queue after a later one.
                    at = clock[0] - gap * rng.choice([0.0, 0.0, 0.0, 0.6, 1.5])
                    served = pod[index % len(pod)] if operation == "switch" else pod
                    duration = rng.choice([0.0, 0.5, 3.0]) if stream else 0.0
                    malformed = rng.random() < 0.02
                    warming = rng.random() < 0.02
                    on = lanes[id(batched)][lane]
                    what = (served, duration, stream, l7, malformed, warming, on)
                    if rng.random() < 0.7:
                        what = shared.setdefault(what, what)
                    batched.count_as(what, at)
                    on = lanes[id(full)][lane]
                    full.record(
                        served,
                        duration_s=duration,
                        stream=stream,
                        l7=l7,
                        malformed=malformed,
                        now=at,
                        warming=warming,
                        lane=on,
                    )
                    until_read -= 1
                    if until_read == 0:  # a reader judges what waits (and what aged out)
                        until_read = rng.randint(1, 80)
                        assert batched.top_share == full.top_share
                        assert batched.moves == full.moves
    assert batched.snapshot(now=clock[0]) == full.snapshot(now=clock[0])
    assert batched.moves == full.moves
    return batched


# The sweep is slow; the fast tier keeps its first seeds.
@pytest.mark.parametrize(
    "seed", [*range(3), *(pytest.param(s, marks=pytest.mark.slow) for s in range(3, 60))]
)
def test_calls_judged_in_a_batch_move_the_detector_as_calls_judged_one_by_one(seed: int) -> None:
    """Calls counted without the lock (``count``, as 32 threads on one channel do) are judged
    in batches, where a run of like calls on a settled verdict is taken without judging each:
    fed the same calls, the detector makes the same transitions, at the same calls, with the
    same gauge figure and the same snapshot, as one that judges every call in full on arrival."""
    _replay_batched(seed)


@pytest.mark.slow
def test_runs_of_like_calls_take_the_steady_path() -> None:
    assert sum(_replay_batched(seed).like_calls for seed in range(10)) > 1000


def test_like_calls_that_age_several_calls_out_are_judged_in_full() -> None:
    """A window of a pinned lane's calls and a few of another pod's: the lane's next call
    comes so late that several of its oldest calls age out at once. Judged in full, that call
    leaves the window less pinned and the state moves (pinned to skewed) at that very call; a
    like call that merely swapped the oldest for itself would keep the state pinned."""
    config = AffinityConfig(window_calls=10, window_s=1, min_samples=3, dwell_calls=1, warmup_s=0)
    for detector in (
        _Moves("10.0.0.1:80", config, clock=lambda: 2.0),
        _MovesJudgingEveryCall("10.0.0.1:80", config, clock=lambda: 2.0),
    ):
        detector.expected_pods = 2
        pinned, other = LaneEvidence("pinned"), LaneEvidence("other")
        for index in range(10):
            detector.record("a", now=index / 1000, lane=pinned)
        detector.record("b", now=0.5, lane=other)
        detector.record("b", now=0.501, lane=other)  # 8 of 10 on "a": still pinned
        for at in (1.001, 1.0055):  # the second ages four calls out
            detector.count("a", 0.0, False, False, False, at, False, pinned)
        assert detector.snapshot(now=1.01).state is AffinityState.SKEWED
        assert detector.moves[-1] == (1.0055, "pinned", "skewed")


def test_like_calls_of_a_lane_in_its_warm_up_stay_out_of_the_window() -> None:
    """A second channel joins a pinned one's target: its first calls fall in its warm-up and
    only teach the pods, even when they queue behind one another like the pinned lane's."""
    config = AffinityConfig(window_calls=10, min_samples=3, dwell_calls=1, warmup_s=1)
    for detector in (
        _Moves("charge-points.ev.svc:50051", config, clock=lambda: 2.0),
        _MovesJudgingEveryCall("charge-points.ev.svc:50051", config, clock=lambda: 2.0),
    ):
        pinned, joining = LaneEvidence("pinned"), LaneEvidence("joining")
        detector.record("a", now=0.0, lane=pinned)
        for index in range(10):
            detector.record("a", now=1.0 + index / 1000, lane=pinned)
        detector.record("a", now=1.1, lane=joining)  # its first call: a connection sample
        detector.record("a", now=1.101, lane=pinned)  # the verdict settles on it
        for at in (1.102, 1.103, 1.104):
            detector.count("a", 0.0, False, False, False, at, False, joining)
        assert detector.snapshot(now=1.2).warmup_calls == 5, type(detector).__name__


#: Metadata blocks a pod (or what stands before it) may send, in headers or in trailers.
_BLOCKS: list[Any] = [
    None,
    (),
    ((POD_HEADER, "pod-a"), ("x-balance-pod-ip", "10.0.0.1")),
    ((POD_HEADER, "pod-b"),),
    ((POD_HEADER, "pod-a"), ("server", "envoy")),
    ((POD_HEADER, "pod-a"), (POD_HEADER, "pod-b")),  # a header repeated, contradicting itself
    (("content-type", "application/grpc"),),
    [(POD_HEADER, "pod-a")],  # not a tuple: read each time, never cached
]


@pytest.mark.parametrize("seed", range(20))
def test_unary_calls_counted_the_short_way_count_as_the_long_way(seed: int) -> None:
    """``CallObserver.count_unary`` (what ``observe()``'s unary calls take, from a cache of
    headers seen with their trailers) moves its detector exactly as ``count(None, False, ...)``
    does, whatever the headers and trailers: trailers that contradict headers seen before are
    malformed, trailers that name the pod add nothing, headers never seen are read."""
    rng = random.Random(seed)
    clock = [0.0]
    config = rng.choice(_BATCHED)
    short, long = (_Moves("10.0.0.1:80", config, clock=lambda: clock[0]) for _ in range(2))
    observers = [CallObserver(d, lane="lane", clock=lambda: clock[0]) for d in (short, long)]
    headers = rng.sample(_BLOCKS, 4)
    for index in range(600):
        clock[0] += rng.choice([0.001, 0.01, 0.3])
        initial = rng.choice(headers)
        trailing = initial if rng.random() < 0.6 else rng.choice(_BLOCKS)
        # As gRPC hands them over: equal blocks, new objects every call.
        copy = [
            None if b is None else type(b)(tuple(pair) for pair in b) for b in (initial, trailing)
        ]
        observers[0].count_unary(*copy)
        copy = [
            None if b is None else type(b)(tuple(pair) for pair in b) for b in (initial, trailing)
        ]
        observers[1].count(None, False, *copy)
        if index % 50 == 49:
            assert short.moves == long.moves and short.top_share == long.top_share
    assert short.snapshot(now=clock[0]) == long.snapshot(now=clock[0])
    assert short.moves == long.moves
    assert len(observers[0].unary_calls) <= len(headers)  # the cache holds headers seen, no more
