"""Pickers: which lane takes the next call. Small callable policy objects.

A picker is called under the pool's lock with the lanes that take calls now (never empty) and
returns one of them; it may keep state of its own (a cursor), which the lock protects.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.orca import LoadReport
from grpc_balance_mw.pool.lane import Lane
from grpc_balance_mw.pool.weights import LaneLoad, WeightConfig

__all__ = ["LeastOutstanding", "Picker", "RoundRobin", "Weighted"]


class Picker(Protocol):
    """Chooses the lane for one call among ``lanes`` (at least one)."""

    def __call__(self, lanes: Sequence[Lane]) -> Lane: ...


class RoundRobin:
    """Each lane in turn."""

    def __init__(self) -> None:
        self._next = 0

    def __repr__(self) -> str:
        return "RoundRobin()"

    def __call__(self, lanes: Sequence[Lane]) -> Lane:
        lane = lanes[self._next % len(lanes)]
        self._next += 1
        return lane


#: Up to this many lanes, every lane is compared: drawing two saves nothing on so few, and the
#: least recently picked of all (not of two drawn) keeps sequential calls in an even rotation.
_EXHAUSTIVE = 8


class LeastOutstanding:
    """Envoy's ``least_request``: of ``choices`` lanes drawn at random, the one with the fewest
    calls in flight ("power of two choices"); among equals, the one picked least recently. With
    at most 8 lanes (the usual case) every lane is compared instead of ``choices`` drawn.

    Sequential calls (always 0 in flight) stay on one lane for a run of up to ``run`` calls
    before moving on: each switch wakes another pod's connection (and, on a small machine,
    another process). Measured here (3 pods behind HAProxy on 2 cores, median of a warm call
    against a plain channel, interleaved): 1.22x switching on every call, 1.03x with runs of 8,
    1.01x with runs of 16. Runs longer than 16 make a fresh affinity-detector window (judged from
    20 calls on, an alarm held for 10) see one pod long enough to call it skewed. Over thousands
    of calls the shares stay even. Under concurrency a lane with more calls in flight than the
    best other one ends the run at once, so the picker is plain least_request. An active lane
    never picked (just activated, e.g. for a pod a scale-up added) ends the run at once too:
    its pod gets the next call, not the one after up to ``run`` more.

    Args:
        choices: lanes drawn per pick (2 is Envoy's default; more approaches least-of-all).
        run: most sequential picks of one lane in a row (1: switch on every pick).
        rng: the random source (injected in tests).
    """

    def __init__(
        self, choices: int = 2, *, run: int = 16, rng: random.Random | None = None
    ) -> None:
        if choices < 2 or run < 1:
            raise ConfigurationError(
                f"LeastOutstanding needs choices >= 2 and run >= 1, got {choices} and {run}"
            )
        self.choices = choices
        self.run = run
        self._rng = rng if rng is not None else random.Random()
        self._last: Lane | None = None
        self._left = 0
        self._exhaustive = max(choices, _EXHAUSTIVE)

    def __repr__(self) -> str:
        return f"LeastOutstanding(choices={self.choices}, run={self.run})"

    def __call__(self, lanes: Sequence[Lane]) -> Lane:
        # On every call, under the pool's lock: a plain loop, no key tuples nor helper calls.
        if len(lanes) <= self._exhaustive:
            drawn: Sequence[Lane] = lanes
        else:
            drawn = self._rng.sample(lanes, self.choices)
        best = drawn[0]
        fewest, oldest = best.in_flight, best.last_picked
        for lane in drawn:  # the first of the fewest in flight, then least recently picked
            flight = lane.in_flight
            if flight < fewest or (flight == fewest and lane.last_picked < oldest):
                best, fewest, oldest = lane, flight, lane.last_picked
        last = self._last
        if (
            self._left > 0
            and last is not None
            and last.in_flight <= fewest
            # An active lane never picked (just activated) goes first. Lanes still being
            # checked, which take calls only while no lane is active, do not count: a run
            # then stays on the one lane whose connection is known to be up.
            and not (oldest == 0 and best.is_available())
            and last in lanes
        ):
            self._left -= 1
            return last
        self._last = best
        self._left = self.run - 1
        return best


class Weighted(LeastOutstanding):
    """Lanes weighed by their pods' own load reports (ORCA, gRFC A58's weights), combined with
    the calls in flight; without usable reports, exactly :class:`LeastOutstanding`.

    A lane's in-flight count shows only this client's calls; a pod's report shows every
    client's load on it, so one client steers away from load that others put on a pod. Each
    lane's weight is A58's ``qps / (utilization + eps / qps * error_penalty)``, used after a
    blackout and dropped when stale (:class:`~grpc_balance_mw.pool.weights.WeightConfig`);
    a lane without a usable weight gets the mean of the others', and with fewer than two
    usable weights every lane weighs the same (A58's fallback to round robin).

    The choice is stride scheduling: each lane has a pass that grows by ``1 / weight`` per
    call it takes, and the lane with the least ``pass + in_flight / weight`` takes the next
    call. Sequential calls (never in flight) are shared in proportion to the weights; under
    concurrency a lane with many calls for its weight waits, and gets no credit for the calls
    it was passed over for (its pass is raised to the chosen lane's), so calls join the
    shortest queue for its weight as Envoy's least_request does and no burst follows.
    Picking the lightest cost alone, ``(in_flight + 1) / weight``, would send every sequential
    call to the heaviest lane and starve the others of the calls whose reports could change
    their weights. The rest is :class:`LeastOutstanding`'s: every lane compared up to 8 lanes,
    runs of up to ``run`` sequential calls on one lane, and an active lane never picked goes
    first.

    The pool gives it each report (:meth:`reported`, under the pool's lock) and each lane
    that begins to take calls for a pod that joined after the start (:meth:`joined`, for
    slow start); it reads the clock only once a report came.

    Args:
        config: A58's blackout, expiry, error penalty and update period, and slow start.
        choices, run, rng: as :class:`LeastOutstanding`'s.
        clock: monotonic seconds (injected in tests).
    """

    #: The pool reads the calls' trailers for load reports only for a picker that says so.
    reads_reports = True

    def __init__(
        self,
        config: WeightConfig | None = None,
        *,
        choices: int = 2,
        run: int = 16,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(choices, run=run, rng=rng)
        self.config = config if config is not None else WeightConfig()
        self.clock = clock
        #: The pool times unary-response calls for this picker (Peak-EWMA is on).
        self.times_calls = self.config.peak_ewma_s is not None
        self._plain = self.config.slow_start is None  # no report came: LeastOutstanding's
        self._weighted = False  # at least two lanes have a usable weight
        self._next_update = 0.0
        self._mean = 1.0
        self._floor = 0.0  # the schedule's time: no lane's pass stays below it
        self._by_latency = False  # latencies differed enough to weigh at the last update

    def __repr__(self) -> str:
        return f"Weighted(choices={self.choices}, run={self.run}, config={self.config})"

    @property
    def weighing(self) -> bool:
        """Whether weights decide now (else the choice is :class:`LeastOutstanding`'s)."""
        return self._weighted

    def reported(self, lane: Lane, report: LoadReport, now: float) -> None:
        """One load report from ``lane``'s pod, at ``now`` (the pool's clock)."""
        load = lane.load
        if load is None:
            load = lane.load = LaneLoad()
        load.add(report, now, self.config)
        if self._plain:
            self._plain = False
            self._next_update = now  # weigh at the next pick

    def joined(self, lane: Lane, now: float) -> None:
        """``lane`` begins to take calls for a pod that joined the target after the pool
        started (the pool calls it under its lock). With slow start on, the next pick weighs
        the lanes: the ramp applies from the pod's first calls, not from the next update, up
        to ``update_s`` later, with a full share until then."""
        if self.config.slow_start is not None:
            self._next_update = -math.inf

    def timed(self, lane: Lane, latency: float, now: float) -> None:
        """One call on ``lane`` took ``latency`` seconds, ending at ``now``."""
        tau = self.config.peak_ewma_s
        if tau is None:
            return
        load = lane.load
        if load is None:
            load = lane.load = LaneLoad()
        load.timed(latency, now, tau)
        if self._plain:
            self._plain = False
            self._next_update = now

    def _latency_weights(self, lanes: Sequence[Lane]) -> list[float] | None:
        """Weights 1 / Peak-EWMA when no pod reports but latencies differ enough (else
        None): cost ``(in_flight + 1) * ewma`` as Linkerd's, in the stride schedule."""
        if self.config.peak_ewma_s is None:
            return None
        ewmas = [
            lane.load.ewma
            for lane in lanes
            if lane.load is not None and lane.load.ewma_at is not None and lane.load.ewma > 0
        ]
        # Hysteresis: latencies start to weigh at latency_spread and stop below its square
        # root, so that jitter near the threshold does not flip the picker on every update.
        spread = self.config.latency_spread
        if self._by_latency:
            spread = math.sqrt(spread)
        self._by_latency = len(ewmas) >= 2 and max(ewmas) >= min(ewmas) * spread
        if not self._by_latency:
            return None
        return [
            1.0 / lane.load.ewma
            if lane.load is not None and lane.load.ewma_at is not None and lane.load.ewma > 0
            else 0.0
            for lane in lanes
        ]

    def weights(self, lanes: Sequence[Lane], now: float) -> bool:
        """Recompute each lane's effective weight at ``now``; whether weights apply (at least
        two lanes have one)."""
        config = self.config
        usable = []
        for lane in lanes:
            load = lane.load
            weight = 0.0 if load is None else load.usable(now, config)
            usable.append(weight)
        known = [weight for weight in usable if weight > 0]
        if len(known) < 2:  # no reports to weigh by: the calls' latencies, if they differ
            latency = self._latency_weights(lanes)
            if latency is not None:
                usable = latency
                known = [weight for weight in usable if weight > 0]
        mean = sum(known) / len(known) if known else 1.0
        slow = config.slow_start
        for lane, weight in zip(lanes, usable, strict=True):
            load = lane.load
            if load is None:
                load = lane.load = LaneLoad()
            effective = weight if weight > 0 else mean
            if slow is not None and lane.joined_at is not None:
                effective *= slow.factor(now - lane.joined_at)
            load.effective = effective
            # A pass run up at a lower weight would hold the lane back once its weight rose:
            # no lane is further ahead of the least pass than one run at its weight now.
            ahead = self._floor + self.run / effective
            if load.passed > ahead:
                load.passed = ahead
        self._mean = mean
        return len(known) >= 2 or (
            slow is not None and any(lane.joined_at is not None for lane in lanes)
        )

    def __call__(self, lanes: Sequence[Lane]) -> Lane:
        if self._plain:
            return LeastOutstanding.__call__(self, lanes)
        now = self.clock()
        if now >= self._next_update:
            self._weighted = self.weights(lanes, now)
            self._next_update = now + self.config.update_s
        if not self._weighted:
            return super().__call__(lanes)
        if len(lanes) <= self._exhaustive:
            drawn: Sequence[Lane] = lanes
        else:
            drawn = self._rng.sample(lanes, self.choices)
        mean, floor = self._mean, self._floor
        best = drawn[0]
        lowest, oldest = math.inf, 0
        for lane in drawn:  # the least pass + in_flight / weight, then least recently picked
            load = lane.load
            if load is None:  # a lane new since the last update
                load = lane.load = LaneLoad()
            if load.effective <= 0:  # ... or its first report came since: the mean until then
                load.effective = mean
            if load.passed < floor:  # new to the schedule, idle or passed over: no credit
                load.passed = floor
            cost = load.passed + lane.in_flight / load.effective
            if cost < lowest or (cost == lowest and lane.last_picked < oldest):
                best, lowest, oldest = lane, cost, lane.last_picked
        last = self._last
        if (
            self._left > 0
            and last is not None
            and last.in_flight <= best.in_flight
            and not (oldest == 0 and best.is_available())
            and last in lanes
        ):
            self._left -= 1
            chosen = last
        else:
            self._last = chosen = best
            self._left = self.run - 1
            # The schedule's time is the pass of the lane it chose: a lane passed over for its
            # calls in flight keeps no credit for the calls it missed, or it would take them in
            # a burst once its calls end, rebuilding the queue it was spared.
            assert best.load is not None
            self._floor = best.load.passed
        load = chosen.load
        assert load is not None
        load.passed += 1.0 / load.effective
        return chosen
