"""The pure pool and calls that pass their deadlines (fake clock, no sockets): a lane whose calls
time out while other lanes answer is suspect at once (no new calls, a health check in the next
round), then kept or drained by that check. A pod that hangs keeps its TCP connection open, so
nothing else would say so before its periodic checks: meanwhile its stuck calls expired together
and the picker sent it a fresh burst after each expiry."""

from __future__ import annotations

import random

from pool_fakes import FakeClock, active_pods, run, scripted

from grpc_balance_mw.pool import CheckResult, Lane, LanePool, PoolConfig, rotate_never


def three_lanes() -> LanePool:
    lanes = LanePool(
        PoolConfig(expected_pods=3, scout_interval_s=None, health_interval_s=5.0),
        rotation=rotate_never(),
        clock=FakeClock(0.0),
        rng=random.Random(1),
    )
    run(lanes, scripted(["pod-0", "pod-1", "pod-2"]), now=0.0)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    return lanes


def lane_of(lanes: LanePool, pod: str) -> Lane:
    return next(lane for lane in lanes.lanes if lane.pod == pod and not lane.is_closed())


def answered_elsewhere(lanes: LanePool, hung: Lane, calls: int = 3) -> None:
    """Calls on the other lanes answer (the picker is bypassed: the test chooses the lanes)."""
    others = [lane for lane in lanes.lanes if lane.is_available() and lane is not hung]
    for i in range(calls):
        lane = others[i % len(others)]
        lane.in_flight += 1
        lanes.release(lane)


def on(lanes: LanePool, lane: Lane) -> None:
    """A call on ``lane`` (as if the picker had chosen it)."""
    lane.in_flight += 1


def expires_while_others_answer(lanes: LanePool, lane: Lane) -> None:
    """A call on ``lane`` passes its deadline after calls on the other lanes answered."""
    on(lanes, lane)
    answered_elsewhere(lanes, lane)
    lanes.release(lane, timed_out=True)


def hanging(pod: str):  # type: ignore[no-untyped-def]
    def check(lane: Lane) -> CheckResult:
        return CheckResult(reachable=lane.pod != pod, pod=lane.pod)

    return check


def test_a_lane_whose_calls_time_out_while_others_answer_takes_no_new_call() -> None:
    lanes = three_lanes()
    hung = lane_of(lanes, "pod-2")
    for _ in range(3):
        on(lanes, hung)
    answered_elsewhere(lanes, hung)
    lanes.release(hung, timed_out=True)  # the first of its stuck calls expires
    assert hung.suspect and not hung.is_available()
    assert "suspect" in repr(hung)
    picked = {lanes.acquire().pod for _ in range(30)}
    assert picked == {"pod-0", "pod-1"}
    # Its other stuck calls expire: nothing changes, they were sent before.
    lanes.release(hung, timed_out=True)
    lanes.release(hung, timed_out=True)
    assert hung.suspect


def test_a_suspect_lane_is_checked_in_the_next_round_and_drained_when_unanswered() -> None:
    lanes = three_lanes()
    hung = lane_of(lanes, "pod-2")
    expires_while_others_answer(lanes, hung)
    plan = run(lanes, hanging("pod-2"), now=0.5)  # long before its periodic check (5 s)
    assert plan.check == [hung]
    assert hung.is_draining() and "timed out" in hung.reason
    assert not plan.dial  # no replacement while it was only suspect: it kept its slot
    plan = run(lanes, scripted(["pod-3"]), now=0.6)
    assert len(plan.dial) == 1  # now its replacement
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-3"]


def test_a_suspect_lane_whose_check_answers_takes_calls_again() -> None:
    lanes = three_lanes()
    slow = lane_of(lanes, "pod-1")
    expires_while_others_answer(lanes, slow)  # one slow call, on a pod that is fine
    plan = run(lanes, scripted([]), now=0.5)
    assert plan.check == [slow] and not plan.dial
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    assert not slow.suspect
    # Judged afresh: a later timeout with no answer elsewhere since is not held against it.
    on(lanes, slow)
    lanes.release(slow, timed_out=True)
    assert slow.is_available()


def test_timeouts_with_no_answer_elsewhere_are_not_one_pods_fault() -> None:
    lanes = three_lanes()
    # Every lane's calls time out (the deadline is too short for the method, or the whole
    # Service is slow): no lane is singled out, periodic checks go on as before.
    for lane in list(lanes.lanes):
        on(lanes, lane)
        lanes.release(lane, timed_out=True)
    assert active_pods(lanes) == ["pod-0", "pod-1", "pod-2"]
    # A lane that answered after the others last did is not suspect either.
    first = lane_of(lanes, "pod-0")
    answered_elsewhere(lanes, first)
    on(lanes, first)
    lanes.release(first)
    on(lanes, first)
    lanes.release(first, timed_out=True)
    assert first.is_available()


def test_with_every_other_lane_gone_a_suspect_lane_still_takes_calls() -> None:
    lanes = three_lanes()
    hung = lane_of(lanes, "pod-2")
    expires_while_others_answer(lanes, hung)
    for pod in ("pod-0", "pod-1"):
        lane = lane_of(lanes, pod)
        on(lanes, lane)
        lanes.release(lane, unavailable=True)
    lane = lanes.acquire()  # no "no lane": the suspect one is better than none
    assert lane is hung
    lanes.release(lane)
