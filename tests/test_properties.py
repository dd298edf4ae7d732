"""Property tests: the header parser and the detector fed arbitrary input keep their promises.

Documented invariants checked here: ``pod_from_metadata`` returns an identity or None and raises
nothing but ``MalformedPodHeader``; ``PodReader`` never raises; the detector never raises, keeps
every share in [0, 1] summing to 1 whenever a call in the window named a pod, never knows more
than ``max_known_pods`` pods, holds at most ``window_calls`` calls, and only changes state with a
transition from one valid state to another (a stale one always to ``unverified``).
"""

from __future__ import annotations

import math
from typing import Any

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
