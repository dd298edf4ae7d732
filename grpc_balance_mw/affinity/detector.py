"""The affinity detector: one per target, fed one call at a time, judged with hysteresis."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.state import AffinitySnapshot, AffinityState, PodShare, Transition
from grpc_balance_mw.affinity.window import PodWindow

Clock = Callable[[], float]
#: Stale known pods are looked for at most this often, to keep ``record`` O(1) in the pod count.
_PRUNE_EVERY_S = 1.0
#: Calls counted with ``count`` are judged at the latest once this many wait.
JUDGE_EVERY_CALLS = 32
#: The most one stream weighs, in calls (``AffinityConfig.stream_unit_s`` each): about eleven
#: days of 1 s units, so a duration that is infinite (or absurd) cannot make shares NaN.
MAX_STREAM_WEIGHT = 1e6
#: One counted call waiting to be judged: (pod, duration_s, stream, l7, malformed, at, warming).
_Counted = tuple[str | None, float, bool, bool, bool, float, bool]


class AffinityDetector:
    """Judges how one target's calls spread over its pods.

    Thread-safe: ``record`` is called from gRPC callback threads and event loops at once; all
    bookkeeping changes under one lock, held for O(pods) work per call. ``count`` is the
    lock-free way in for callers that do not need the transition at once: the call waits in a
    queue and is judged, in order and with its own timestamp (so with the same outcome as
    ``record``), by the next reader or writer, or once ``JUDGE_EVERY_CALLS`` calls wait. Judging
    a batch runs the same Python with warm caches, which is several times cheaper per call than
    judging each call just after gRPC's C core ran.

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
        self._known: dict[str, float] = {}  # pod -> last seen
        self._max_known = self.config.max_known_pods
        self._known_dropped = 0
        self._dns_pods = 0
        self._malformed = 0
        self._warmup_calls = 0
        self._top_share = 0.0
        self._next_prune = 0.0
        self._counted: deque[_Counted] = deque()
        #: A stale transition found by a reader (not a call), for the next record or expire.
        self._unreported: Transition | None = None
        forking.track(self)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held by another thread)."""
        self._lock = threading.Lock()

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

    def add_known_pods(self, pods: Iterable[str], *, now: float | None = None) -> None:
        """Pods known to exist from outside the calls (the probe); judged from the next call on."""
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            for pod in pods:
                self._known[pod] = at
                if len(self._known) > self._max_known:
                    self._make_room(pod, at)

    def set_dns_answer(self, addresses: Iterable[str]) -> None:
        """The addresses a headless Service's DNS name resolved to: one per ready pod."""
        with self._lock:
            self._judge_counted()
            self._dns_pods = len(set(addresses))

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
                teaches the known pods but is left out of the window.

        Returns:
            The state change this call caused, if any.
        """
        at = self._clock() if now is None else now
        with self._lock:
            earlier = self._judge_counted()
            own = self._add(pod, duration_s, stream, l7, malformed, at, warming)
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
    ) -> None:
        """Count one finished call like ``record``, but judge it later and without the lock.

        For callers that ignore the transition: one that the call causes is returned by the
        next ``record`` instead (if no later transition supersedes it).
        """
        counted = self._counted
        counted.append((pod, duration_s, stream, l7, malformed, now, warming))
        if len(counted) >= JUDGE_EVERY_CALLS:
            with self._lock:
                self._judge_counted()

    def _catch_up(self) -> None:
        if self._counted or self._window.ages_out(self._clock()):
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
        if self._state is AffinityState.UNVERIFIED or window.identified_calls or window.l7_calls:
            return None
        previous, self._state = self._state, AffinityState.UNVERIFIED
        self._pending, self._pending_calls = None, 0
        self._top_share = 0.0
        return Transition(
            self.target, previous, AffinityState.UNVERIFIED, self._snapshot(now), stale=True
        )

    def _judge_counted(self) -> Transition | None:
        """Judge the calls that ``count`` queued, oldest first; the lock is held."""
        last = None
        counted = self._counted
        while counted:
            transition = self._add(*counted.popleft())
            if transition is not None:
                last = transition
        if last is not None and last.stale:  # judged by no one's call: keep it for a reporter
            self._unreported = last
        return last

    def _add(
        self,
        pod: str | None,
        duration_s: float,
        stream: bool,
        l7: bool,
        malformed: bool,
        at: float,
        warming: bool = False,
    ) -> Transition | None:
        if malformed:
            self._malformed += 1
        if pod is not None:
            known = self._known
            known[pod] = at
            if len(known) > self._max_known:
                self._make_room(pod, at)
        window = self._window
        stale = None
        if window.ages_out(at):  # a pause longer than the window: judge the silence first
            window.evict(at)
            stale = self._go_stale(at)
        if warming:
            self._warmup_calls += 1
            return stale
        weight = 1.0
        if stream and duration_s > self.config.stream_unit_s:  # False for NaN
            weight = min(duration_s / self.config.stream_unit_s, MAX_STREAM_WEIGHT)
        window.add(pod, weight, l7, at)
        return self._judge(at) or stale

    def _known_count(self) -> int:
        return max(len(self._known), self._expected or 0, self._dns_pods)

    def _forget_stale_pods(self, now: float) -> None:
        horizon = now - self.config.known_pods_ttl_s
        for pod in [p for p, seen in self._known.items() if seen < horizon]:
            del self._known[pod]

    def _make_room(self, newest: str, now: float) -> None:
        """More than ``max_known_pods`` are known: forget the stale ones, and if that is not
        enough, the half seen longest ago (``newest``, just seen, stays). Dropping half at once
        keeps the sort's cost O(log n) per pod learned however many a server makes up."""
        self._forget_stale_pods(now)
        known = self._known
        if len(known) <= self._max_known:
            return
        keep = max(self._max_known // 2, 1)
        kept = dict(sorted(known.items(), key=lambda item: item[1], reverse=True)[:keep])
        kept[newest] = now
        self._known = kept
        self._known_dropped += len(known) - len(kept)

    def _candidate(self) -> AffinityState | None:
        """The state the window argues for now, or None when it is too small to argue."""
        cfg, window, current = self.config, self._window, self._state
        if len(window) >= cfg.min_samples and window.l7_calls >= cfg.l7_enter_share * len(window):
            return AffinityState.L7_BALANCED
        if window.identified_calls < cfg.min_samples:
            return None
        _, top_share = window.top()
        self._top_share = top_share
        known = self._known_count()
        if known <= 1:
            return AffinityState.UNVERIFIED
        fair = 1.0 / known
        pinned_line = (
            cfg.pinned_exit_share if current is AffinityState.PINNED else cfg.pinned_enter_share
        )
        if top_share >= pinned_line:
            return AffinityState.PINNED
        excess = cfg.skew_exit_excess if current.is_alarm else cfg.skew_enter_excess
        if top_share >= fair + excess * (1.0 - fair):
            return AffinityState.SKEWED
        return AffinityState.BALANCED

    def _judge(self, now: float) -> Transition | None:
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_EVERY_S
            self._forget_stale_pods(now)
        stale = self._go_stale(now)  # calls go on, but none names a pod any more
        if stale is not None:
            return stale
        candidate = self._candidate()
        if candidate is None or candidate is self._state:
            self._pending, self._pending_calls = None, 0
            return None
        if candidate is self._pending:
            self._pending_calls += 1
        else:
            self._pending, self._pending_calls = candidate, 1
        if self._pending_calls < self.config.dwell_calls:
            return None
        previous, self._state = self._state, candidate
        self._pending, self._pending_calls = None, 0
        return Transition(self.target, previous, candidate, self._snapshot(now))

    def snapshot(self, *, now: float | None = None) -> AffinitySnapshot:
        """The numbers behind the current state."""
        at = self._clock() if now is None else now
        with self._lock:
            self._judge_counted()
            self._expire(at)
            return self._snapshot(at)

    def _snapshot(self, now: float) -> AffinitySnapshot:
        window = self._window
        top_pod, top_share = window.top()
        total = len(window)
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
            known_count=self._known_count(),
            expected_pods=self._expected,
            dns_pods=self._dns_pods,
            l7_share=window.l7_calls / total if total else 0.0,
            warmup_calls=self._warmup_calls,
            known_pods_dropped=self._known_dropped,
        )
