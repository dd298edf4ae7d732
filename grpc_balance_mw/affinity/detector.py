"""The affinity detector: one per target, fed one call at a time, judged with hysteresis."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from grpc_balance_mw._membership import Membership, Source
from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.advice import (
    VOICES,
    Cause,
    advice,
    alarm_cause,
    one_pod_or_client_ip,
    say,
)
from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.evidence import ConnectionWindow, top_count_chance
from grpc_balance_mw.affinity.lanes import LaneEvidence, LaneStep
from grpc_balance_mw.affinity.state import (
    AffinitySnapshot,
    AffinityState,
    PodEvent,
    PodShare,
    Transition,
)
from grpc_balance_mw.affinity.targets import literal_addresses
from grpc_balance_mw.affinity.window import L7_HEADERS, PER_REQUEST, PodWindow

_log = logging.getLogger(__name__)

Clock = Callable[[], float]
#: Stale known pods are looked for at most this often, to keep ``record`` O(1) in the pod count.
_PRUNE_EVERY_S = 1.0
#: Calls tell the membership model that their pod exists at most this often per pod: enough to
#: reset its misses (a run of misses takes many fresh connections), and O(1) per call.
_CONFIRM_EVERY_S = 1.0
#: Calls counted with ``count`` are judged at the latest once this many wait.
JUDGE_EVERY_CALLS = 64
#: The most one stream weighs, in calls (``AffinityConfig.stream_unit_s`` each): about eleven
#: days of 1 s units, so a duration that is infinite (or absurd) cannot make shares NaN.
MAX_STREAM_WEIGHT = 1e6
#: What a counted call was: (pod, duration_s, stream, l7, malformed, warming, lane). An observer
#: hands over one such tuple for all its like calls (``count_as``), so that telling a like call
#: from another is one identity check.
Counted = tuple[str | None, float, bool, bool, bool, bool, LaneEvidence | None]
#: One counted call waiting to be judged: (what it was, when it ended).
_Waiting = tuple[Counted, float]
#: Lanes remembered at once (the oldest are forgotten first), and pod events kept unread.
_MAX_LANES = 4096
_FIRST, _ROTATED = LaneStep.FIRST, LaneStep.ROTATED
_MAX_POD_EVENTS = 64
#: Causes said once each even when the state's warning was already given (see ``_announce``).
_SAID_BY_CAUSE = frozenset({Cause.CLIENT_IP, Cause.ONE_POD_OR_CLIENT_IP, Cause.UNIDENTIFIED})


class AffinityDetector:
    """Judges how one target's calls spread over its pods.

    The evidence is connections, not calls: each call comes with its lane (one channel, see
    :class:`~.lanes.LaneEvidence`), whose first call and reconnects are connection samples and whose
    frequent pod switches mark per-request balancing. A call recorded without a lane counts as
    its own connection (an independent sample).

    Thread-safe: ``record`` is called from gRPC callback threads and event loops at once; all
    bookkeeping changes under one lock, held for O(1) work per call whatever the pod count.
    ``count`` is the lock-free way in for callers that do not need the transition at once: the
    call waits in a queue and is judged, in order and with its own timestamp (so with the same
    outcome as ``record``), by the next reader or writer, or once ``JUDGE_EVERY_CALLS`` calls
    wait. Judging a batch runs the same Python with warm caches, which is several times cheaper
    per call than judging each call just after gRPC's C core ran.

    Args:
        target: the channel target, for snapshots and alarms.
        config: thresholds and windows.
        clock: monotonic seconds; injected so tests never sleep.
    """

    def __init__(
        self,
        target: str,
        config: AffinityConfig | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.target = target
        self.config = config if config is not None else AffinityConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._window = PodWindow(self.config.window_calls, self.config.window_s)
        self._state = AffinityState.UNVERIFIED
        self._pending: AffinityState | None = None
        self._pending_calls = 0
        self._expected = self.config.expected_pods
        #: The pods behind the target, from evidence: this detector's (calls, probe rounds,
        #: DNS answers, calls that failed UNAVAILABLE) and, while a balanced channel runs on
        #: the target, its pool's (lanes' health checks, scouts), which shares this model. A
        #: pod leaves on evidence (see :mod:`grpc_balance_mw._membership`), or once it went
        #: unconfirmed for ``known_pods_ttl_s``, an upper bound.
        self.membership = Membership()
        self.membership.expect(self._expected)
        #: ``expected_pods`` as long as evidence has not overruled it (see the model's hints).
        self._expected_counted = self._expected
        self._members_version = -1
        #: The pods that count (the model's live pods), each with when this detector last
        #: told the model a call reached it (or learned of it).
        self._known: dict[str, float] = {}
        self._max_known = self.config.max_known_pods
        self._known_dropped = 0
        self._dns_pods = 0
        self._malformed = 0
        self._warmup_calls = 0
        self._top_share = 0.0
        self._next_prune = 0.0
        #: Calls counted (``count``, ``count_as``) and not judged yet, oldest first. A caller on
        #: a hot path may append ``(what, at)`` itself, as ``count_as`` does, and then call
        #: ``judge_waiting`` once ``JUDGE_EVERY_CALLS`` wait.
        self.waiting: deque[_Waiting] = deque()
        self._connections = ConnectionWindow(self.config.window_calls, self.config.window_s)
        self._lanes: dict[LaneEvidence, None] = {}
        self._literal_addresses = literal_addresses(target)
        self._dns_answered = False
        #: Set by whoever starts resolving the target's name (once per detector).
        self.resolution_started = False
        #: When the next probe round of the target is due, for probes that share a schedule
        #: (the default probe of every channel observed to this target).
        self.next_probe_at = 0.0
        self._from_probe: set[str] = set()
        self._skew_verdict = (-1, 0, False)  # (connections.version, known pods, significant)
        #: Changes with whatever the judging reads besides the window and the connections:
        #: the pods known, expected and in the DNS answer.
        self._facts = 0
        #: What the verdict was worked out from when a call was last judged to stay in its
        #: state; while it is unchanged, so is the verdict (see ``_settled_on``).
        self._settled: tuple[object, ...] | None = None
        #: Whether the last verdict worked out came from the share of L7 or per-request calls
        #: alone (``_candidate``'s first branch), which reads no pod's share.
        self._by_flags = False
        self._chances: dict[tuple[int, int, int], float] = {}
        #: Pod events not yet taken (``take_pod_events``); telemetry drains it per call.
        self.pod_events: deque[PodEvent] = deque(maxlen=_MAX_POD_EVENTS)
        #: Outlier ejections of this target's pods by balanced channels (``note_pod_event``),
        #: and the pods ejected now: read by telemetry's metrics.
        self.ejections = 0
        self.ejected_pods: set[str] = set()
        #: A stale transition found by a reader (not a call), for the next record or expire.
        self._unreported: Transition | None = None
        #: Balanced channels that took over calls of this target (``observe(rebalance=)``).
        self._on_lanes = 0
        #: The situations this detector said once at warning level (``_announce``).
        self._said: set[Cause | str] = set()
        #: Observers (channels, lanes, interceptors) feeding this detector now (``attach``),
        #: and whether the last of them went since (their calls are then a closed channel's).
        self._observers = 0
        self._orphaned = False
        #: Guards those two. Reentrant and apart from ``_lock``: ``detach`` runs from a
        #: finalizer, which the garbage collector may call in a thread holding either.
        self._count_lock = threading.RLock()
        forking.track(self)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held by another thread)."""
        self._lock = threading.Lock()
        self._count_lock = threading.RLock()
        self.membership.reset_after_fork()

    def __repr__(self) -> str:
        self._catch_up()
        return (
            f"<AffinityDetector {self.target} {self._state.value}: "
            f"{len(self._window)} calls, top share {self._top_share:.2f}, "
            f"{self._known_count()} known pods>"
        )

    @property
    def state(self) -> AffinityState:
        self._catch_up()
        return self._state

    @property
    def top_share(self) -> float:
        """The top pod's share at the last judged call (for gauges); 0.0 while unverified for
        want of calls, and once the window went stale."""
        self._catch_up()
        return self._top_share

    def expire(self, *, now: float | None = None) -> Transition | None:
        """Forget calls older than the window; a window left without any call that named a pod
        (or carried L7 headers) returns the target to ``UNVERIFIED``.

        Readers (``state``, ``top_share``, ``snapshot``) do this too; ``expire`` also returns
        the transition, once, for someone to report it (the telemetry's gauge callback, which
        runs even when no call does). ``record`` returns one that no one reported yet.
        """
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            self._expire(at)
            unreported, self._unreported = self._unreported, None
            return unreported

    @property
    def expected_pods(self) -> int | None:
        return self._expected

    @expected_pods.setter
    def expected_pods(self, count: int | None) -> None:
        with self._lock:
            self._judge_counted()
            self._expected = count
            self.membership.expect(count)  # the same count again keeps the model's verdict
            self._expected_counted = self.membership.expected() if count is not None else None
            self._facts += 1

    def add_known_pods(
        self, pods: Iterable[str], *, now: float | None = None, fresh: bool = True
    ) -> None:
        """Pods the probe found, one per connection it dialed; judged from the next call on.

        Args:
            pods: the pod each probe connection reached, in order (repeats included).
            now: the clock reading; default the injected clock.
            fresh: the connections went through the target as the channel's do (a fresh
                connection each), so where they landed is connection evidence; False when
                they were dialed to each address directly.
        """
        at = self._clock() if now is None else now
        membership = self.membership
        with self._lock:
            self._judge_counted()
            self._facts += 1
            for pod in pods:
                if fresh:  # a random pick of the Service's: the pods it missed count a miss
                    membership.fresh(pod, Source.PROBE, at)
                    self._connections.add(pod, at, probe=True)
                else:
                    membership.confirmed(pod, Source.DNS, at)
                self._sync_members(at, added="probe", gone="probe")
                if pod in self._known:
                    self._known[pod] = at

    def forget_pods(self, pods: Iterable[str], *, now: float | None = None) -> None:
        """Pods known to be gone (not in a DNS answer whose every address was dialed)."""
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            self._facts += 1
            for pod in pods:
                if self.membership.knows(pod):
                    self.membership.gone(pod, "not in the DNS answer", at)
            self._sync_members(at, gone="dns")

    def unavailable(self, lane: LaneEvidence | None, *, now: float | None = None) -> None:
        """A call on ``lane`` failed UNAVAILABLE and no pod named the status: the connection
        to the lane's pod was refused or dropped, which is gone evidence for that pod (it
        counts again once a call or a probe reaches it)."""
        pod = lane.pod if lane is not None else None
        if pod is None:
            return
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            if self.membership.gone(pod, "calls failed UNAVAILABLE naming no pod", at):
                self._sync_members(at, gone="unavailable")

    def set_dns_answer(self, addresses: Iterable[str]) -> None:
        """The addresses the target's DNS name resolved to (a headless Service: one per ready
        pod; a ClusterIP Service's name: one)."""
        with self._lock:
            self._judge_counted()
            self._dns_pods = len(set(addresses))
            self._dns_answered = True
            self._facts += 1

    @property
    def addresses(self) -> int | None:
        """How many addresses the target stands for, None while unknown."""
        if self._literal_addresses is not None:
            return self._literal_addresses
        return self._dns_pods if self._dns_answered else None

    def lanes_opened(self, opened: bool = True) -> None:
        """A balanced channel took over calls of this target (``opened``), or was closed: while
        one is open, the advice for an alarm is not to use one (see ``advice(on_lanes=)``)."""
        with self._lock:
            self._on_lanes = max(0, self._on_lanes + (1 if opened else -1))

    def attach(self) -> None:
        """An observer (one channel or lane) starts feeding this detector."""
        with self._count_lock:
            self._observers += 1

    def detach(self) -> None:
        """An observer is closed (or collected); its calls stay evidence until
        :meth:`forget_closed_calls` (snapshots read after a channel closed still show them)."""
        with self._count_lock:
            self._observers = max(0, self._observers - 1)
            self._orphaned = self._observers == 0

    def forget_closed_calls(self) -> None:
        """A channel is about to use this detector: if every observer that fed it is closed and
        their calls raised an alarm (pinned, skewed, or one on its way), forget those calls and
        withdraw the alarm.

        Those calls described channels that no longer exist (one closed plain channel's calls
        all on its one pod), and a channel opened later to the same target (a balanced one,
        say) must not start out pinned, or skewed by them. What was learnt of the target itself
        stays: the pods known, the DNS answer, the expected count, and where fresh connections
        landed. Calls that raised no alarm stay too: waves of short channels, each closed
        before the next opens, add up to one verdict (and calls recorded with no observer ever
        attached, as tests do, are never forgotten).
        """
        self._catch_up()  # calls counted and not judged yet may be what raises the alarm
        with self._lock:
            with self._count_lock:
                if self._observers or not self._orphaned:
                    return
                self._orphaned = False
            pending = self._pending
            if not (self._state.is_alarm or (pending is not None and pending.is_alarm)):
                return
            self.waiting.clear()
            self._window = PodWindow(self.config.window_calls, self.config.window_s)
            self._state = AffinityState.UNVERIFIED
            self._pending, self._pending_calls = None, 0
            self._top_share = 0.0
            self._settled, self._by_flags, self._unreported = None, False, None

    def take_pod_events(self) -> list[PodEvent]:
        """The pod events since the last call, oldest first (for telemetry)."""
        with self._lock:
            events = list(self.pod_events)
            self.pod_events.clear()
        return events

    def note_pod_event(self, kind: str, pod: str, source: str, at: float) -> None:
        """A pod event from outside the detector (the balanced channel's pool ejected or
        returned a pod): telemetry puts it on the next call's span, as the detector's own."""
        with self._lock:
            if kind == "pod_ejected":
                self.ejections += 1
                self.ejected_pods.add(pod)
            elif kind == "pod_returned":
                self.ejected_pods.discard(pod)
            self._pod_event(kind, pod, source, at)

    def _pod_event(self, kind: str, pod: str, source: str, at: float) -> None:
        self.pod_events.append(PodEvent(kind, self.target, pod, source, at))

    def record(
        self,
        pod: str | None,
        *,
        duration_s: float = 0.0,
        stream: bool = False,
        l7: bool = False,
        malformed: bool = False,
        now: float | None = None,
        warming: bool = False,
        lane: LaneEvidence | None = None,
    ) -> Transition | None:
        """Count one finished call.

        Args:
            pod: the pod that served it, or None when the response named none.
            duration_s: how long the call lasted; weighs streams.
            stream: whether it was a streaming call (weighted by duration).
            l7: whether the response carried an L7 proxy's headers.
            malformed: the pod header was there but invalid (``pod`` is then None).
            now: the clock reading; default the injected clock.
            warming: the call came in its channel's warm-up (``AffinityConfig.warmup_s``): it
                teaches the known pods but is left out of the window. With a lane, the lane's
                own warm-up applies as well.
            lane: the lane (channel) that made the call; None: the call is its own connection.

        Returns:
            The state change this call caused, if any.
        """
        at = self._clock() if now is None else now
        with self._lock:
            earlier = self._judge_counted()
            own = self._add(pod, duration_s, stream, l7, malformed, at, warming, lane)
            if own is None and earlier is None and self._unreported is not None:
                earlier = self._unreported
            self._unreported = None
            return own or earlier

    def count(
        self,
        pod: str | None,
        duration_s: float,
        stream: bool,
        l7: bool,
        malformed: bool,
        now: float,
        warming: bool = False,
        lane: LaneEvidence | None = None,
    ) -> None:
        """Count one finished call like ``record``, but judge it later and without the lock.

        For callers that ignore the transition: one that the call causes is returned by the
        next ``record`` instead (if no later transition supersedes it).
        """
        waiting = self.waiting  # count_as, inlined: the interceptors' path, one frame less
        waiting.append(((pod, duration_s, stream, l7, malformed, warming, lane), now))
        if len(waiting) >= JUDGE_EVERY_CALLS:
            self.judge_waiting()

    def count_as(self, what: Counted, now: float) -> None:
        """``count`` of a call given as one tuple, ``(pod, duration_s, stream, l7, malformed,
        warming, lane)``: an observer that passes the same tuple for every call like it (same
        pod, lane and flags) has them judged as one call and an identity check each."""
        waiting = self.waiting
        waiting.append((what, now))
        if len(waiting) >= JUDGE_EVERY_CALLS:
            self.judge_waiting()

    def judge_waiting(self) -> None:
        """Judge the calls waiting, unless another thread is at it."""
        # Never wait for the lock here: a thread holding it is judging the queue, this call
        # included or the next batch's. Waiting made a convoy of every caller that finished a
        # call meanwhile (32 threads on one channel: +20 % client CPU on a loaded machine).
        if self._lock.acquire(blocking=False):
            try:
                self._judge_counted()
            finally:
                self._lock.release()

    def _catch_up(self) -> None:
        if self.waiting or self._window.ages_out(self._clock()):
            with self._lock:
                self._judge_counted()
                self._expire(self._clock())

    def _expire(self, now: float) -> None:
        """Evict aged-out calls; the lock is held. A stale transition waits in ``_unreported``."""
        self._window.evict(now)
        stale = self._go_stale(now)
        if stale is not None:
            self._unreported = stale

    def _go_stale(self, now: float) -> Transition | None:
        """Back to UNVERIFIED if no call in the window names a pod or carries L7 headers."""
        window = self._window
        state = self._state
        if state is AffinityState.UNVERIFIED or window.identified_calls or window.l7_calls:
            return None
        if state is AffinityState.UNIDENTIFIED and len(window):
            return None  # still calls, none naming a pod: that is the state itself
        previous, self._state = self._state, AffinityState.UNVERIFIED
        self._pending, self._pending_calls = None, 0
        self._top_share = 0.0
        return Transition(
            self.target, previous, AffinityState.UNVERIFIED, self._snapshot(now), stale=True
        )

    def _judge_counted(self) -> Transition | None:
        """Judge the calls that ``count`` queued, oldest first; the lock is held."""
        last = None
        counted = self.waiting
        while counted:
            call = counted.popleft()
            (pod, duration_s, stream, l7, malformed, warming, lane), at = call
            transition = self._add(pod, duration_s, stream, l7, malformed, at, warming, lane)
            if transition is not None:
                last = transition
            elif counted and self._settled is not None and counted[0][0][6] is lane:
                # Only a call on the same lane can be like this one: interleaved lanes (a
                # balanced channel's) skip the attempt.
                self._take_like_calls(call)
        if last is not None and last.stale:  # judged by no one's call: keep it for a reporter
            self._unreported = last
        return last

    def _take_like_calls(self, first: _Waiting) -> None:
        """Take the queued calls that follow ``first`` and are like it, while judging each in
        full would change nothing but clocks and the order of the window's calls; the lock is
        held, and ``first`` was just counted and did not move the state.

        Like ``first``: the same lane and pod, a unary weight, no L7 headers, not malformed,
        not warming, and in time order. ``first`` left its pod known and its lane on that pod;
        while the lane is warm and not ``switching``, a like call is judged, and is neither a
        connection sample nor a pod switch. The verdict is settled (``_settled``) on what it
        reads now, and stays so: the window is full and its oldest call is like them, so its
        totals stay (``version`` too); a call that would age out more calls than that oldest
        one, or falls due to prune, breaks the run and is judged in full. A call in time order
        cannot reach back into a recent rotation, which ``_settled_on`` reads (a thread may
        queue its call after a later one).

        The steady state of a pinned channel: 32 threads' calls on one channel are judged as
        one call and a few comparisons each.
        """
        what, last_at = first
        pod, _, _, _, _, _, lane = what
        if (
            pod is None
            or lane is None
            or not lane.warm  # like calls would fall in the lane's warm-up too
            or lane.switching
        ):
            return
        samples = self._window.samples
        if len(samples) < max(self._window.max_calls, 2) or self._settled != self._settled_on(lane):
            return
        unit_s = self.config.stream_unit_s
        # Calls counted as the very tuple ``first`` was (one observer's like calls) are like
        # it by identity, if it is like itself.
        like = what if _is_like(what, pod, lane, unit_s) else None
        counted = self.waiting
        max_age_s = self._window.max_age_s
        prune_at = self._next_prune
        taken = 0
        while counted:
            call_what, at = counted[0]
            oldest = samples[0]
            if (
                (call_what is not like and not _is_like(call_what, pod, lane, unit_s))
                or at < last_at
                or at >= prune_at
                or oldest[1] != pod
                or oldest[2] != 1
                or oldest[3]
                # The next oldest ages out too (one alone leaving and a like call coming is
                # what the swap does).
                or samples[1][0] < at - max_age_s
            ):
                break
            counted.popleft()
            samples.popleft()
            samples.append((at, pod, 1, 0))
            taken += 1
            last_at = at
        if taken:
            self._reached(pod, last_at)
            lane.steady(taken, last_at)

    def _add(
        self,
        pod: str | None,
        duration_s: float,
        stream: bool,
        l7: bool,
        malformed: bool,
        at: float,
        warming: bool = False,
        lane: LaneEvidence | None = None,
    ) -> Transition | None:
        if malformed:
            self._malformed += 1
        flags = L7_HEADERS if l7 else 0
        if pod is not None:
            self._reached(pod, at)
            if lane is None:
                self._connections.add(pod, at)
        if lane is not None:
            lanes = self._lanes
            if lane not in lanes:
                lanes[lane] = None
                if len(lanes) > _MAX_LANES:
                    del lanes[next(iter(lanes))]
            if pod is not None:
                step = lane.see(pod, at)
                if step is _FIRST or step is _ROTATED:
                    self._connections.add(pod, at)
            else:
                lane.last_at = at
            if lane.per_request:
                flags |= PER_REQUEST
            if not lane.warm and lane.warming(at, self.config.warmup_s, self._pods_to_see()):
                warming = True
        window = self._window
        stale = None
        if window.ages_out(at):  # a pause longer than the window: judge the silence first
            window.evict(at)
            stale = self._go_stale(at)
        if warming:
            self._warmup_calls += 1
            return stale
        weight = 1
        if stream and duration_s > self.config.stream_unit_s:  # False for NaN
            weight = round(min(duration_s / self.config.stream_unit_s, MAX_STREAM_WEIGHT))
        window.add(pod, weight, flags, at)
        return self._judge(at, lane) or stale

    def _pods_to_see(self) -> int | None:
        """How many pods a lane must see to end its warm-up (see ``LaneEvidence.warming``)."""
        addresses = self.addresses
        if addresses is None:
            return None
        if addresses <= 1:
            return 0
        return min(self._known_count(), addresses)

    def _single_address(self) -> bool:
        return self.addresses == 1

    def _known_count(self) -> int:
        return max(len(self._known), self._expected_counted or 0, self._dns_pods)

    def _reached(self, pod: str, at: float) -> None:
        """A call named ``pod``: tell the model it exists (at most once per
        ``_CONFIRM_EVERY_S`` per pod); the lock is held. While a balanced channel runs on the
        target, calls only confirm pods the model knows: its lanes' checks find every pod its
        calls reach, and a pod that names itself anew on every call must not add pods."""
        seen = self._known.get(pod)
        if seen is not None and at - seen < _CONFIRM_EVERY_S:
            return
        self.membership.confirmed(pod, Source.CALL, at, learn=self._on_lanes == 0)
        self._sync_members(at, newest=pod)
        if pod in self._known:
            self._known[pod] = at

    def _sync_members(
        self, at: float, *, added: str = "calls", gone: str = "evidence", newest: str | None = None
    ) -> None:
        """Follow the model's live pods, with a pod event for each change; the lock is held.

        Args:
            at: the clock reading.
            added: what told of pods new to this detector (for their events).
            gone: what told of pods that left.
            newest: a pod just seen, kept if the bound on known pods is hit.
        """
        membership = self.membership
        version = membership.version
        if version == self._members_version:
            return
        live = membership.live()
        self._members_version = membership.version
        known = self._known
        if len(live) != len(known) or not known.keys() >= set(live):
            counted = set(live)
            for pod in [p for p in known if p not in counted]:
                del known[pod]
                self._from_probe.discard(pod)
                self._pod_event("pod_gone", pod, gone, at)
            for pod in live:
                if pod not in known:
                    known[pod] = at
                    if added == "probe":
                        self._from_probe.add(pod)
                    self._pod_event("pod_added", pod, added, at)
            self._facts += 1
            if len(known) > self._max_known:
                self._make_room(newest if newest is not None else live[-1], at)

    def _forget_stale_pods(self, now: float) -> None:
        self._facts += 1
        # Pods found gone are remembered as gone for a while only, and expected_pods is a hint
        # that evidence may overrule (with one warning): with no pool asking for the count,
        # this is where both are judged.
        membership = self.membership
        membership.count(now)
        self._expected_counted = membership.expected() if self._expected is not None else None
        for notice in membership.take_notices():
            _log.warning("grpc_balance_mw: %s: %s", self.target, notice)
        self._sync_members(now, added="lanes")  # what a balanced channel's pool found
        ttl = self.config.known_pods_ttl_s
        horizon = now - ttl
        for pod in [p for p, seen in self._known.items() if seen < horizon]:
            confirmed = membership.seen_since(pod)  # a pool's checks may have, since
            if confirmed is not None and confirmed >= horizon:
                self._known[pod] = confirmed
            else:
                membership.forget(pod, f"not confirmed for {ttl:g} s (known_pods_ttl_s)")
        self._sync_members(now, gone="ttl")
        horizon = now - self.config.window_s
        for lane in [lane for lane in self._lanes if lane.last_at < horizon]:
            del self._lanes[lane]

    def _make_room(self, newest: str, now: float) -> None:
        """More than ``max_known_pods`` are known: forget the half seen longest ago
        (``newest``, just seen, stays). Dropping half at once
        keeps the sort's cost O(log n) per pod learned however many a server makes up."""
        known = self._known
        keep = max(self._max_known // 2, 1)
        kept = dict(sorted(known.items(), key=lambda item: item[1], reverse=True)[:keep])
        kept[newest] = now
        for pod in known.keys() - kept.keys():
            self.membership.forget(pod, "more pods than max_known_pods")
        self._members_version = self.membership.version
        self._known = kept
        self._known_dropped += len(known) - len(kept)
        self._from_probe &= kept.keys()

    def _candidate(self, lane: LaneEvidence | None) -> AffinityState | None:
        """The state the evidence argues for now, or None when it is too little to argue."""
        cfg, window, current = self.config, self._window, self._state
        calls = len(window)
        top_share = self._top_share = window.top_share
        self._by_flags = False
        if not window.identified_calls and not window.l7_calls:
            # Per-request flags alone, on calls that name no pod: nothing to judge, or the
            # state would go stale (``_go_stale``) on the next call, and back, call after call.
            # Enough calls and not one named a pod: the servers stamp no identity.
            if calls >= cfg.min_samples:
                return AffinityState.UNIDENTIFIED
            return AffinityState.UNVERIFIED
        if calls >= cfg.min_samples:
            if window.l7_calls >= cfg.l7_enter_share * calls:
                self._by_flags = True
                return AffinityState.L7_BALANCED
            if window.per_request_calls >= cfg.l7_enter_share * calls:
                # Switching pods between calls on one address: something in between balances
                # per request. On a name with several addresses: the client's round_robin.
                self._by_flags = True
                if self._single_address():
                    return AffinityState.L7_BALANCED
                return AffinityState.BALANCED
        if window.identified_calls < cfg.min_samples:
            return None
        known = self._known_count()
        if known <= 1:
            connections = self._connections
            if (
                current is AffinityState.UNVERIFIED and Cause.ONE_POD_OR_CLIENT_IP not in self._said
            ) and one_pod_or_client_ip(
                len(connections), connections.top, known, cfg.chance_alpha
            ):  # said once: after that, this costs a set lookup per judged call
                self._announce(self._clock())
            return AffinityState.UNVERIFIED
        pinned_line = (
            cfg.pinned_exit_share if current is AffinityState.PINNED else cfg.pinned_enter_share
        )
        rotated_at = lane.rotated_at if lane is not None else None
        if (
            lane is not None
            and rotated_at is not None
            and lane.last_at - rotated_at <= cfg.window_s
        ):
            return self._by_connections(lane, known, pinned_line)
        if top_share >= pinned_line:
            if current is AffinityState.PINNED or self._pinned_evidence(lane, known):
                return AffinityState.PINNED
            return None  # it looks pinned, but too few connections say so
        fair = 1.0 / known
        excess = cfg.skew_exit_excess if current.is_alarm else cfg.skew_enter_excess
        if top_share >= fair + excess * (1.0 - fair):
            if current.is_alarm or self._skew_evidence(known):
                return AffinityState.SKEWED
            return None  # as uneven as a random placement of so few connections is
        return AffinityState.BALANCED

    def _by_connections(
        self, lane: LaneEvidence, known: int, pinned_line: float
    ) -> AffinityState | None:
        """A rotating lane: argue from its connections, not from a window of calls that may all
        ride one of them.

        When the window spans several of the lane's connections (at least four of its mean
        length), the calls weigh each connection by its load, and a reconnect to the same pod,
        which no pod switch reveals, still counts; the number of connections, for the chance
        test, is estimated from the mean length. Otherwise the connections themselves count.
        """
        window = self._window
        mean_length = lane.calls / lane.epochs
        calls = len(window)
        if calls >= 4 * mean_length:
            count = round(calls / mean_length)
            share = window.top_share
            top = round(share * count)
        else:
            connections = self._connections
            count, top = len(connections), connections.top
            share = top / count if count else 0.0
        if count < 2:
            return None
        fair = 1.0 / known
        cfg = self.config
        excess = cfg.skew_exit_excess if self._state.is_alarm else cfg.skew_enter_excess
        if share >= fair + excess * (1.0 - fair):
            if self._chance(top, count, known) > cfg.chance_alpha:
                return None
            return AffinityState.PINNED if share >= pinned_line else AffinityState.SKEWED
        return AffinityState.BALANCED if count >= known else None

    def _chance(self, top: int, count: int, known: int) -> float:
        """``top_count_chance``, remembered: the same figures come back call after call."""
        memo = self._chances
        key = (top, count, known)
        chance = memo.get(key)
        if chance is None:
            if len(memo) >= 1024:
                memo.clear()
            chance = memo[key] = top_count_chance(top, count, known)
        return chance

    def _pinned_evidence(self, lane: LaneEvidence | None, known: int) -> bool:
        """One lane long on one pod, or recent connections crowding one pod beyond chance.

        A lane whose connection was replaced within the window is not evidence on its own: at a
        high call rate, 200 calls fit inside one connection's life even when rotation spreads
        the connections well; its connections are judged instead.
        """
        if (
            lane is not None
            and not lane.per_request
            and lane.run >= self.config.min_samples
            and (lane.rotated_at is None or lane.last_at - lane.rotated_at > self.config.window_s)
        ):
            return True
        return self._skew_evidence(known)

    def _skew_evidence(self, known: int) -> bool:
        """Whether the recent connections crowd one pod more than chance explains (all ``n``
        on one of ``k`` pods: ``k * (1/k)**n``; in general a binomial tail)."""
        connections = self._connections
        version, pods, verdict = self._skew_verdict
        if version != connections.version or pods != known:
            chance = top_count_chance(connections.top, len(connections), known)
            verdict = chance <= self.config.chance_alpha
            self._skew_verdict = (connections.version, known, verdict)
        return verdict

    def _settled_on(self, lane: LaneEvidence | None) -> tuple[object, ...] | None:
        """What the last verdict worked out was read from, to tell whether it still holds.

        A verdict from the share of L7 or per-request calls (``_by_flags``) reads the window's
        size, those two counts and whether any call in it named a pod; any other reads the
        window's totals (its ``version``), the connections, and the lane only when its recent
        rotation makes the verdict argue from the lane's own connections (``_by_connections``),
        which change with every call: None then, never settled. Both read the pods known,
        expected and from DNS (``_facts``) and the state. The two shapes differ in length, so
        they never compare equal.
        """
        window = self._window
        if self._by_flags:
            return (
                len(window),
                window.l7_calls,
                window.per_request_calls,
                window.identified_calls,  # none left: the state goes stale (``_go_stale``)
                self._facts,
                self._state,
            )
        if (
            lane is not None
            and lane.rotated_at is not None
            and lane.last_at - lane.rotated_at <= self.config.window_s
        ):
            return None
        return (window.version, self._connections.version, self._facts, self._state)

    def _judge(self, now: float, lane: LaneEvidence | None = None) -> Transition | None:
        if self.membership.version != self._members_version:  # a pool's evidence
            self._sync_members(now, added="lanes")
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            self._forget_stale_pods(now)
        settled = self._settled
        if settled is not None and settled == self._settled_on(lane):
            if self._by_flags:  # the gauge's figure, as working the verdict out would set it
                self._top_share = self._window.top_share
            return None
        stale = self._go_stale(now)  # calls go on, but none names a pod any more
        if stale is not None:
            self._settled = None
            return stale
        candidate = self._candidate(lane)
        if candidate is None or candidate is self._state:
            self._pending, self._pending_calls = None, 0
            self._settled = self._settled_on(lane) if candidate is not None else None
            return None
        self._settled = None
        if candidate is self._pending:
            self._pending_calls += 1
        else:
            self._pending, self._pending_calls = candidate, 1
        if self._pending_calls < self.config.dwell_calls:
            return None
        previous, self._state = self._state, candidate
        self._pending, self._pending_calls = None, 0
        snapshot = self._snapshot(now)
        announced = self._announce(now, snapshot)
        return Transition(self.target, previous, candidate, snapshot, announced=announced)

    def announce(self, *, now: float | None = None) -> bool:
        """Say the current cause at warning level if it was never said for this target (a probe
        round that just changed the evidence asks); whether it was said now."""
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            return self._announce(at)

    def _announce(self, now: float, snapshot: AffinitySnapshot | None = None) -> bool:
        """Log the snapshot's cause once per target, in the table's words; the lock is held.

        Every cause the user has something to fix for is said once, whoever watches (with
        telemetry or without): a pinned channel, servers that stamp nothing, one pod or
        ClientIP. Telemetry repeats alarms at its own interval.
        """
        if snapshot is None:
            snapshot = self._snapshot(now)
        if snapshot.cause is None:
            return False
        cause = Cause(snapshot.cause)
        voice = VOICES[cause]
        # Said once per situation: the causes that need a fix of their own (on the Service, on
        # the servers) each; a pinned or skewed spread once whatever the connections suggest.
        said = cause if cause in _SAID_BY_CAUSE else snapshot.state.value
        if said in self._said or not voice.problem:
            return False
        self._said.add(said)
        _log.warning("%s", say(self.target, cause, snapshot.state.value, evidence_of(snapshot)))
        return True

    def snapshot(self, *, now: float | None = None) -> AffinitySnapshot:
        """The numbers behind the current state."""
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            self._sync_members(at, added="lanes")
            self._expire(at)
            return self._snapshot(at)

    def _snapshot(self, now: float) -> AffinitySnapshot:
        window, connections = self._window, self._connections
        connections.evict(now)
        top_pod, top_share = window.top()
        total = len(window)
        horizon = now - self.config.window_s
        lanes = [lane for lane in self._lanes if lane.last_at >= horizon]
        per_request = sum(lane.per_request for lane in lanes)
        known = self._known_count()
        cause = None
        if self._state is AffinityState.UNIDENTIFIED:
            cause = Cause.UNIDENTIFIED
        elif self._state is AffinityState.UNVERIFIED and one_pod_or_client_ip(
            len(connections), connections.top, known, self.config.chance_alpha
        ):
            cause = Cause.ONE_POD_OR_CLIENT_IP
        elif self._state.is_alarm or self._state is AffinityState.L7_BALANCED or per_request:
            cause = alarm_cause(
                connections=len(connections),
                on_top=connections.top,
                known_pods=known,
                lanes=len(lanes),
                rotated=any(lane.rotated and not lane.per_request for lane in lanes),
                per_request=not self._state.is_alarm,
                alpha=self.config.chance_alpha,
            )
        from_probe = len(self._from_probe)
        return AffinitySnapshot(
            target=self.target,
            state=self._state,
            calls=total,
            unknown_calls=window.calls.get(None, 0),
            malformed_calls=self._malformed,
            pods={pod: PodShare(c, w, s) for pod, (c, w, s) in window.shares().items()},
            top_pod=top_pod,
            top_share=top_share,
            known_pods=tuple(sorted(self._known)),
            known_count=known,
            expected_pods=self._expected,
            dns_pods=self._dns_pods,
            l7_share=window.l7_calls / total if total else 0.0,
            warmup_calls=self._warmup_calls,
            connections=len(connections),
            connection_pods=dict(connections.pods.counts),
            probe_connections=connections.probed,
            lanes=len(lanes),
            per_request_lanes=per_request,
            rotated_lanes=sum(lane.rotated and not lane.per_request for lane in lanes),
            warming_lanes=sum(not lane.warm for lane in lanes),
            addresses=self.addresses,
            known_from={
                "calls": len(self._known) - from_probe,
                "probe": from_probe,
                "dns": self._dns_pods,
                "expected": self._expected or 0,
            },
            cause=cause.value if cause is not None else None,
            advice=advice(cause, on_lanes=self._on_lanes > 0) if cause is not None else None,
            known_pods_dropped=self._known_dropped,
        )


def evidence_of(snapshot: AffinitySnapshot) -> str:
    """What was seen, for a warning: calls, the top pod, pods known, where connections went."""
    parts = [f"{snapshot.calls} recent calls"]
    if snapshot.top_pod is not None:
        parts.append(f"{snapshot.top_share:.0%} on pod {snapshot.top_pod}")
    parts.append(f"{snapshot.known_count} pod(s) known")
    if snapshot.connections:
        on = ", ".join(f"{pod}: {n}" for pod, n in snapshot.connection_pods.items())
        parts.append(f"{snapshot.connections} fresh connection(s) ({on})")
    return "; ".join(parts)


def _is_like(what: Counted, pod: str, lane: LaneEvidence, unit_s: float) -> bool:
    """Whether a counted call is like a judged one on ``pod`` and ``lane``: the same lane and
    pod, a unary weight, no L7 headers, not malformed, not warming."""
    call_pod, duration_s, stream, l7, malformed, warming, call_lane = what
    return (
        call_lane is lane
        and call_pod == pod
        and not (l7 or malformed or warming)
        and not (stream and duration_s > unit_s)  # weighs more than one call
    )
