"""The evidence core without sockets: lanes, connection counts, chance, warm-up, causes, advice.

Every test drives the detector the way a channel does (one lane per channel, calls in order)
with an injected clock, so call rates of 1 ms and 100 ms are the same test run twice.
"""

from __future__ import annotations

import itertools
import random

import pytest

from grpc_balance_mw.affinity import AffinityConfig, AffinityDetector, AffinityState
from grpc_balance_mw.affinity.advice import Cause, advice
from grpc_balance_mw.affinity.counts import TopCounter
from grpc_balance_mw.affinity.evidence import all_on_one_chance, top_count_chance
from grpc_balance_mw.affinity.lanes import LaneEvidence, LaneStep
from grpc_balance_mw.affinity.targets import literal_addresses

B, U, S, P, L7 = (
    AffinityState.BALANCED,
    AffinityState.UNVERIFIED,
    AffinityState.SKEWED,
    AffinityState.PINNED,
    AffinityState.L7_BALANCED,
)
CLUSTER_IP = "10.96.0.10:80"
HEADLESS = "dns://10.96.0.53:53/charge-points.ev.svc.cluster.local:50051"


class Calls:
    """Feeds a detector the calls of lanes, advancing a fake clock by ``every_s`` per call."""

    def __init__(self, detector: AffinityDetector, every_s: float = 0.001) -> None:
        self.detector = detector
        self.every_s = every_s
        self.now = 1000.0
        self.entered: list[tuple[int, AffinityState]] = []
        self.made = 0

    def run(self, lane: LaneEvidence, pods: str | list[str]) -> list[AffinityState]:
        entered = []
        for pod in pods:
            self.now += self.every_s
            self.made += 1
            transition = self.detector.record(pod, now=self.now, lane=lane)
            if transition is not None:
                entered.append(transition.current)
                self.entered.append((self.made, transition.current))
        return entered


def test_top_counter_keeps_the_largest_count_under_adds_and_removes() -> None:
    rng = random.Random(7)
    counter: TopCounter[int] = TopCounter()
    held: list[tuple[int, int]] = []
    for _ in range(5000):
        if held and rng.random() < 0.45:
            key, amount = held.pop(rng.randrange(len(held)))
            counter.remove(key, amount)
        else:
            key, amount = rng.randrange(40), rng.choice([1, 1, 1, 5])
            counter.add(key, amount)
            held.append((key, amount))
        assert counter.top == max(counter.counts.values(), default=0)
        assert counter.total == sum(amount for _, amount in held)
    assert counter.top_key() is None or counter.counts[counter.top_key()] == counter.top


def test_a_steady_lane_rotates_rarely_and_a_switching_lane_balances_per_request() -> None:
    lane = LaneEvidence("one")
    steps = [lane.see(pod, float(i)) for i, pod in enumerate("a" * 30 + "b" * 30 + "c" * 5)]
    assert steps[0] is LaneStep.FIRST and steps.count(LaneStep.ROTATED) == 2
    assert (lane.epochs, lane.switches, lane.per_request, lane.rotated) == (3, 2, False, True)
    switching = LaneEvidence("two")
    steps = [switching.see(pod, float(i)) for i, pod in enumerate("abc" * 10)]
    assert switching.per_request and steps[-1] is LaneStep.SWITCHED
    for i in range(33):  # a switch, then 32 calls without one: one connection again
        switching.see("a", 100.0 + i)
    assert not switching.per_request


@pytest.mark.parametrize(
    ("pods_to_see", "seen", "warming"),
    [(0, "a", False), (3, "aab", True), (3, "abc", False), (None, "abc", True)],
)
def test_lane_warm_up_ends_with_its_cause(
    pods_to_see: int | None, seen: str, warming: bool
) -> None:
    lane = LaneEvidence()
    for i, pod in enumerate(seen):
        lane.see(pod, 10.0 + i * 0.01)
    assert lane.warming(10.05, 1.0, pods_to_see) is warming
    assert lane.warming(11.5, 1.0, pods_to_see) is False  # the time bound ends any warm-up
    assert lane.warm


@pytest.mark.parametrize(
    ("target", "count"),
    [
        ("10.96.0.10:80", 1),
        ("[::1]:50051", 1),
        ("dns:///10.0.0.1:80", 1),
        ("ipv4:10.0.0.1:80,10.0.0.2:80", 2),
        ("unix:/run/app.sock", 1),
        ("charge-points.ev:80", None),
        (HEADLESS, None),
    ],
)
def test_literal_addresses(target: str, count: int | None) -> None:
    assert literal_addresses(target) == count


def test_chance_of_connections_on_one_pod() -> None:
    assert all_on_one_chance(1, 3) == 1.0
    assert all_on_one_chance(3, 3) == pytest.approx(1 / 9)
    assert all_on_one_chance(8, 3) == pytest.approx(1 / 2187)
    assert top_count_chance(8, 8, 3) == pytest.approx(3 / 3**8)  # all on one: 3 * (1/3)**8
    assert top_count_chance(2, 3, 3) == 1.0 or top_count_chance(2, 3, 3) > 0.5
    assert top_count_chance(10, 30, 3) == 1.0  # exactly fair
    assert top_count_chance(25, 30, 3) < 1e-6


@pytest.mark.parametrize("every_s", [0.001, 0.1])
def test_one_channel_through_a_cluster_ip_alarms_within_its_first_calls(every_s: float) -> None:
    detector = AffinityDetector(CLUSTER_IP)  # defaults: warm-up and all
    detector.expected_pods = 3
    calls = Calls(detector, every_s)
    calls.run(LaneEvidence(), "a" * 100)
    config = detector.config
    assert calls.entered == [(config.min_samples + config.dwell_calls - 1, P)]
    snapshot = detector.snapshot(now=calls.now)
    assert (snapshot.cause, snapshot.connections, snapshot.lanes) == ("single_connection", 1, 1)
    assert snapshot.warmup_calls == 0 and snapshot.addresses == 1
    assert "grpc_balance_mw.balanced_channel" in (snapshot.advice or "")


def test_round_robin_first_calls_on_one_subchannel_raise_nothing() -> None:
    detector = AffinityDetector(HEADLESS, AffinityConfig(warmup_s=5.0))
    detector.set_dns_answer(["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    calls = Calls(detector)
    lane = LaneEvidence()
    # round_robin's start: the first subchannel that connected takes the first 45 calls; the
    # warm-up ends at the call that reaches the third pod (46 on a, then b: 47 warm-up calls).
    assert calls.run(lane, "a" * 45 + "abc" * 200) == [B]
    snapshot = detector.snapshot(now=calls.now)
    assert snapshot.warmup_calls == 47 and snapshot.per_request_lanes == 1
    assert snapshot.addresses == 3 and snapshot.state is B


def test_pods_switching_on_one_address_are_balanced_per_request_in_front() -> None:
    detector = AffinityDetector("127.0.0.1:8080")
    detector.expected_pods = 3
    rng = random.Random(3)
    calls = Calls(detector)
    assert calls.run(LaneEvidence(), [rng.choice("abc") for _ in range(300)]) == [L7]
    snapshot = detector.snapshot(now=calls.now)
    assert snapshot.cause == "per_request" and snapshot.l7_share == 0.0


def test_a_per_request_lane_whose_calls_stop_naming_a_pod_goes_unidentified_once() -> None:
    """The server stops stamping its pod (a rollout without the header) on a lane that was
    switching pods: the state says so once (unidentified) and stays, not back and forth call
    after call (the lane's per-request flag outlives the pods it was learned from)."""
    detector = AffinityDetector("127.0.0.1:8080", AffinityConfig(window_calls=40))
    detector.expected_pods = 3
    calls, lane = Calls(detector), LaneEvidence()
    assert calls.run(lane, list("abc" * 20)) == [L7]
    unnamed: list[str | None] = [None] * 200
    unidentified = AffinityState.UNIDENTIFIED
    assert calls.run(lane, unnamed) == [U, unidentified]  # type: ignore[arg-type]
    assert detector.snapshot(now=calls.now).state is unidentified


@pytest.mark.slow
def test_many_fresh_channels_on_a_shared_detector_never_alarm() -> None:
    """30 channels of 10 calls, each its own connection at random over 3 pods, 300 times."""
    alarms = 0
    for seed in range(300):
        rng = random.Random(seed)
        detector = AffinityDetector(CLUSTER_IP)
        detector.expected_pods = 3
        calls = Calls(detector)
        for _ in range(30):
            calls.run(LaneEvidence(), rng.choice("abc") * 10)
        alarms += sum(state.is_alarm for _, state in calls.entered)
    assert alarms == 0
    snapshot = detector.snapshot(now=calls.now)
    assert snapshot.lanes == 30 and snapshot.connections == 30
    assert len(snapshot.connection_pods) == 3 and snapshot.state is not U


def test_every_channel_on_one_pod_is_named_as_such() -> None:
    """Every fresh connection on one pod while more are known: sessionAffinity ClientIP."""
    detector = AffinityDetector(CLUSTER_IP)
    detector.expected_pods = 3
    calls = Calls(detector)
    for _ in range(10):
        calls.run(LaneEvidence(), "a" * 10)
    assert [state for _, state in calls.entered] == [P]
    snapshot = detector.snapshot(now=calls.now)
    assert snapshot.cause == Cause.SAME_POD_EVERY_CONNECTION.value
    assert "sessionAffinity" in (snapshot.advice or "")


def test_the_probe_s_fresh_connections_name_client_ip_affinity() -> None:
    detector = AffinityDetector(CLUSTER_IP)
    detector.expected_pods = 3
    calls = Calls(detector)
    calls.run(LaneEvidence(), "a" * 40)
    assert detector.snapshot(now=calls.now).cause == "single_connection"
    detector.add_known_pods(["a"] * 6, now=calls.now)  # two probe rounds of three dials
    assert detector.snapshot(now=calls.now).cause == "single_connection"  # 1 in 729: not yet
    detector.add_known_pods(["a"] * 3, now=calls.now)  # 10 connections: 1 in 19,683
    snapshot = detector.snapshot(now=calls.now)
    assert snapshot.cause == "same_pod_every_connection" and snapshot.probe_connections == 9


def test_rotation_that_stays_skewed_is_named() -> None:
    """Reconnects every 20 calls, but most land on pod a again (a reconnect to the same pod
    shows no switch: the calls, weighed over many connections, tell)."""
    detector = AffinityDetector(CLUSTER_IP, AffinityConfig(window_calls=1000))
    detector.expected_pods = 3
    calls, lane = Calls(detector), LaneEvidence()
    for pod in itertools.islice(itertools.cycle("aaaaabac"), 120):
        calls.run(lane, pod * 20)
    snapshot = detector.snapshot(now=calls.now)
    assert lane.rotated and not lane.per_request
    assert [state for _, state in calls.entered] == [P, S] and snapshot.state is S
    assert snapshot.cause == "rotation_skewed" and "max_connection_age" in (snapshot.advice or "")


def test_rotation_that_spreads_connections_raises_nothing_at_a_high_call_rate() -> None:
    """max_connection_age at 1,000 calls/s: each connection lives longer than the window."""
    detector = AffinityDetector(CLUSTER_IP)
    detector.expected_pods = 3
    calls, lane, rng = Calls(detector), LaneEvidence(), random.Random(5)
    for pod in "abc":  # the first reconnects, each to another pod
        calls.run(lane, pod * 500)
    for _ in range(30):  # then a reconnect every 500 calls, each to a pod kube-proxy picks
        calls.run(lane, rng.choice("abc") * 500)
    # Pinned while one connection carried every call; balanced once connections rotate.
    assert [state for _, state in calls.entered] == [P, B]
    assert lane.epochs > 10 and detector.snapshot(now=calls.now).rotated_lanes == 1


def test_one_pod_and_nothing_more_known_stays_unverified() -> None:
    detector = AffinityDetector(CLUSTER_IP)
    calls = Calls(detector)
    assert calls.run(LaneEvidence(), "a" * 300) == [U] or detector.state is U
    assert detector.snapshot(now=calls.now).known_from["calls"] == 1


def test_pod_events_mark_pods_added_and_gone() -> None:
    detector = AffinityDetector(HEADLESS)
    detector.record("a", now=1.0, lane=LaneEvidence())
    detector.add_known_pods(["a", "b"], now=2.0, fresh=False)
    detector.forget_pods(["b"], now=3.0)
    events = [(e.kind, e.pod, e.source) for e in detector.take_pod_events()]
    assert events == [
        ("pod_added", "a", "calls"),
        ("pod_added", "b", "probe"),
        ("pod_gone", "b", "dns"),
    ]
    assert detector.take_pod_events() == []


@pytest.mark.parametrize("cause", list(Cause))
def test_advice_never_names_a_missing_feature(cause: Cause) -> None:
    text = advice(cause)
    assert "balanced channel" not in text or "grpc_balance_mw.balanced_channel" in text


def test_pod_events_reach_the_log_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """A server that names a new pod per call cannot flood the log with pod_added lines."""
    import logging

    from grpc_balance_mw.affinity import CallObserver
    from grpc_balance_mw.telemetry import AffinityTelemetry

    clock = [0.0]
    telemetry = AffinityTelemetry(spans=False, metrics=False, clock=lambda: clock[0])
    observer = CallObserver(AffinityDetector(CLUSTER_IP), telemetry=telemetry)
    caplog.set_level(logging.INFO, logger="grpc_balance_mw.telemetry")
    for i in range(100):
        observer.begin("/svc.S/M", "unary_unary").finish([("x-balance-pod", f"p-{i}")], None, 0)
    lines = [r.getMessage() for r in caplog.records if "pod_added" in r.getMessage()]
    assert len(lines) == 8 and "pod_added p-0 (from calls)" in lines[0]
    assert telemetry.pod_events_unlogged == 92


def test_an_observer_on_several_channels_keeps_a_lane_per_channel() -> None:
    """An interceptor installed on several channels: a lane each, the first its own; a lane
    is forgotten with its channel, and beyond the limit the oldest goes first."""
    import gc

    from grpc_balance_mw.affinity import CallObserver
    from grpc_balance_mw.affinity.lanes import ChannelLanes

    class Channel:  # any object an adapter finds the calls going through
        pass

    observer = CallObserver(AffinityDetector(CLUSTER_IP), lane="lane-a")
    first, second = Channel(), Channel()
    own = observer.lane_evidence
    assert observer.lane_of(None) is own and observer.lane_of(first) is own
    other = observer.lane_of(second)
    assert other is not own and other is observer.lane_of(second) and other.name == "lane-a.1"
    assert observer.begin("/s.S/M", "unary_unary", second).lane is other
    assert observer.begin("/s.S/M", "unary_unary").lane is own
    assert observer.channel_lanes is not None and len(observer.channel_lanes) == 2
    del second
    gc.collect()
    assert len(observer.channel_lanes) == 1
    assert CallObserver(AffinityDetector(CLUSTER_IP), fresh_connections=True).lane_of(first) is None
    lanes = ChannelLanes(LaneEvidence("x"), limit=2)
    made = [lanes.lane(key) for key in (1, 2, 3)]
    assert lanes.get(1) is None and [lanes.get(2), lanes.get(3)] == made[1:]


def test_channels_pinned_each_to_its_own_pod_are_not_per_request_balancing() -> None:
    """Three channels on three pods, calls interleaved: counted per channel, three connections
    spread over the pods; counted as one lane they would switch at every call."""
    spread, merged = AffinityDetector(CLUSTER_IP), AffinityDetector(CLUSTER_IP)
    spread.expected_pods = merged.expected_pods = 3
    lanes, one = [LaneEvidence(), LaneEvidence(), LaneEvidence()], LaneEvidence()
    feed_spread, feed_merged = Calls(spread), Calls(merged)
    for _ in range(60):
        for lane, pod in zip(lanes, "abc", strict=True):
            feed_spread.run(lane, pod)
            feed_merged.run(one, pod)
    snapshot = spread.snapshot(now=feed_spread.now)
    assert snapshot.state is B and snapshot.per_request_lanes == 0 and snapshot.connections == 3
    # What one lane for all of them said (the bug this guards against):
    assert merged.snapshot(now=feed_merged.now).state is L7
