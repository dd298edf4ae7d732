"""Which pods stand behind a target, from evidence: who reached them, and who found them gone.

Pure (no gRPC, no I/O; the clock is passed in): one :class:`Membership` per target, which the
affinity detector owns (``AffinityDetector.membership``) and judges from, and which a balanced
channel's pool shares (:meth:`LanePool.share_membership`) and sizes itself from
(:meth:`Membership.count`). Both feed it from their own threads: every method takes the model's
own lock, and :attr:`Membership.version` changes whenever the pods that count change, so a
reader can tell without walking them.

A pod is **known** once something reached it: a lane's health check, a fresh connection (a scout,
a new lane), a call, a probe round, a DNS answer. It stays known until evidence says it left,
never merely because time passed (a pod seen an hour ago by a channel that made no connection
since is still the best guess):

- **Gone evidence** (:meth:`Membership.gone`): a lane's pod answered NOT_SERVING, refused or
  dropped connections (calls failed UNAVAILABLE with no pod naming the status), or stopped
  answering health checks. The pod stops counting at once; it counts again if found again.
- **Misses** (:meth:`Membership.fresh`): behind a ClusterIP, every fresh connection reaches a
  pod picked at random. With ``n`` pods known, ``k`` fresh connections in a row that all reach
  *other* pods while this one still exists happen with probability::

      P(k misses | pod still there) = ((n - 1) / n) ** k

  A pod is dropped after the smallest ``k`` that makes this below ``confidence`` (1e-3 by
  default: ``k = ceil(ln(confidence) / ln((n - 1) / n))``; 10 for 2 pods, 18 for 3, 25 for 4,
  52 for 8; see :func:`misses_to_forget`). A health check that names the pod, or any fresh
  connection that reaches it, resets its count, and a pod an open connection holds (a lane
  whose last check named it) counts no misses: that connection is the better evidence.
  Misses count only while the run of fresh connections reached at least two distinct pods:
  connections that all reach one pod are what Service ``sessionAffinity: ClientIP`` looks
  like, which says nothing about the other pods.
- **Hints**: ``expected_pods`` (the user's) and the affinity detector's count of pods its calls
  reached. A hint larger than the pods known is believed until fresh connections contradict it:
  ``m`` fresh connections in a row (reaching at least two distinct pods) that found no pod
  beyond the ``known`` ones happen with probability ``(known / hint) ** m`` if ``hint`` pods
  exist; below ``confidence`` the hint is contradicted. ``expected_pods`` is overruled once it
  has been contradicted (either way: fewer pods found, or more) for ``hint_patience_s``, and
  :meth:`Membership.take_notices` then returns one warning (the Deployment was probably scaled).
  The detector's count is overruled as soon as it is contradicted (it judges from this model,
  but also counts a DNS answer's addresses; it is no configuration to warn about). The detector
  reads ``expected_pods`` through :meth:`Membership.expected`, so an overruled hint stops
  counting for its alarm too.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

__all__ = ["Membership", "PodRecord", "Source", "misses_to_forget"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[Membership, _P], _R],
) -> Callable[Concatenate[Membership, _P], _R]:
    """Run ``method`` under the model's lock: the detector and a pool feed one model from
    their own threads, each under its own lock."""

    def locked(self: Membership, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self, *args, **kwargs)

    locked.__name__, locked.__qualname__ = method.__name__, method.__qualname__
    locked.__doc__ = method.__doc__
    return locked


#: Default confidence: a pod that still exists is dropped by misses at most this often per run.
CONFIDENCE = 1e-3


class Source(enum.Enum):
    """How a pod was learned or last confirmed."""

    CALL = "call"
    CHECK = "health check"
    SCOUT = "scout"
    LANE = "new lane"
    PROBE = "probe round"
    DNS = "dns answer"
    HINT = "expected_pods"


#: Sources that are a fresh connection through the Service (a random pick among the pods).
FRESH = frozenset({Source.SCOUT, Source.LANE, Source.PROBE})


def misses_to_forget(known: int, confidence: float = CONFIDENCE) -> int:
    """Fresh connections in a row that must miss a pod before it is dropped, with ``known`` pods
    known (itself included): the smallest ``k`` with ``((known - 1) / known) ** k < confidence``.
    With one pod known, misses cannot happen (a connection reaching another pod makes two)."""
    if known <= 1:
        return 1
    return math.floor(math.log(confidence) / math.log((known - 1) / known)) + 1


@dataclass
class PodRecord:
    """What is known of one pod.

    Attributes:
        name: the pod's name (its identity stamp).
        sources: every way it was learned or confirmed.
        first_seen: when it was first learned.
        confirmed_at: when evidence last said it exists.
        misses: fresh connections in a row since then that reached other pods.
        gone_since: when gone evidence was seen (None: none since it was last confirmed).
        gone_cause: that evidence, for logs.
    """

    name: str
    sources: set[Source] = field(default_factory=set)
    first_seen: float = 0.0
    confirmed_at: float = 0.0
    misses: int = 0
    gone_since: float | None = None
    gone_cause: str | None = None


@dataclass
class _Hint:
    pods: int | None = None
    contradicted_since: float | None = None
    overruled: bool = False


class Membership:
    """The pods behind one target.

    Args:
        confidence: the probability, for a pod that still exists, of being dropped by one run of
            misses (see the module doc).
        hint_patience_s: how long fresh connections must contradict ``expected_pods`` before the
            evidence wins.
        forget_gone_s: how long a pod dropped by gone evidence is remembered as gone (for
            :meth:`down`, which tells the pool which lanes to rotate).
    """

    def __init__(
        self,
        *,
        confidence: float = CONFIDENCE,
        hint_patience_s: float = 10.0,
        forget_gone_s: float = 30.0,
    ) -> None:
        if not 0 < confidence < 1 or hint_patience_s < 0 or forget_gone_s <= 0:
            raise ValueError("need 0 < confidence < 1, hint_patience_s >= 0, forget_gone_s > 0")
        self.confidence = confidence
        self.hint_patience_s = hint_patience_s
        self.forget_gone_s = forget_gone_s
        self.pods: dict[str, PodRecord] = {}
        #: Changes whenever the pods that count (:meth:`live`) change.
        self.version = 0
        self._lock = threading.RLock()
        self._expected = _Hint()
        self._called = _Hint()
        self._run = 0  # fresh connections in a row that reached known pods only
        self._run_pods: set[str] = set()  # the distinct pods they reached
        self._notices: list[str] = []
        #: Pods dropped, and why, for logs and tests (the newest last; bounded).
        self.dropped: list[tuple[str, str]] = []

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (a parent's thread may have held it)."""
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<Membership {sorted(self.live())} count={self._count()}>"

    # -- evidence ----------------------------------------------------------------------------

    @_locked
    def expect(self, pods: int | None) -> None:
        """The user's ``expected_pods`` (None: no hint)."""
        if pods != self._expected.pods:
            self._expected = _Hint(pods)

    @_locked
    def called(self, pods: int) -> None:
        """How many pods the target's calls reached, by the affinity detector's count."""
        if pods != self._called.pods:
            self._called = _Hint(pods or None)

    @_locked
    def confirmed(self, pod: str, source: Source, now: float, *, learn: bool = True) -> bool:
        """Evidence that ``pod`` exists now (a check named it, a call reached it...). Returns
        whether the pod was unknown (or counted as gone) before. ``learn=False``: only confirm
        a pod that counts now (a balanced channel's calls reach only pods its lanes' checks
        found, and a pod naming itself anew on every call must not add pods through them; a
        draining pod answers calls after its check said NOT_SERVING, and stays gone)."""
        record = self.pods.get(pod)
        new = record is None or record.gone_since is not None
        if new and not learn:
            return False
        if record is None:
            record = self.pods[pod] = PodRecord(pod, first_seen=now)
            self.version += 1
        elif record.gone_since is not None:
            self.version += 1
        record.sources.add(source)
        record.confirmed_at = now
        record.misses = 0
        record.gone_since = record.gone_cause = None
        return new

    @_locked
    def fresh(self, pod: str, source: Source, now: float, held: Collection[str] = ()) -> bool:
        """A fresh connection through the Service reached ``pod``: it exists, and every other
        pod counted a miss, except the pods in ``held`` (an open connection, e.g. a lane whose
        last check named it, holds each: were the pod gone, that connection would have broken
        or reached another pod). Returns whether ``pod`` was unknown before (a change)."""
        new = self.confirmed(pod, source, now)
        if new:
            self._run, self._run_pods = 0, set()
        else:
            self._run += 1
            self._run_pods.add(pod)
        spread = len(self._run_pods) >= 2  # one pod only: affinity, not absence
        live = self.live()
        need = misses_to_forget(len(live), self.confidence)
        for other in live:
            record = self.pods[other]
            if other == pod or other in held:
                record.misses = 0
                continue
            record.misses += 1
            if spread and record.misses >= need:
                self._drop(other, f"{record.misses} fresh connections in a row missed it")
        return new

    @_locked
    def gone(self, pod: str, cause: str, now: float) -> bool:
        """Evidence that ``pod`` left (NOT_SERVING, connections refused or dropped, checks
        unanswered). Returns whether it counted until now (a change)."""
        record = self.pods.get(pod)
        if record is None:
            record = self.pods[pod] = PodRecord(pod, first_seen=now, confirmed_at=now)
        was = record.gone_since is None
        if was:
            record.gone_since, record.gone_cause = now, cause
            self.version += 1
        return was

    @_locked
    def forget(self, pod: str, why: str) -> None:
        """Drop ``pod`` whatever the evidence (a bound on how many pods are remembered, or on
        how long one is believed unconfirmed: ``AffinityConfig.known_pods_ttl_s``)."""
        if pod in self.pods:
            self._drop(pod, why)

    @_locked
    def seen_since(self, pod: str) -> float | None:
        """When ``pod`` was last confirmed, None if not known."""
        record = self.pods.get(pod)
        return record.confirmed_at if record is not None else None

    # -- what is known -----------------------------------------------------------------------

    @_locked
    def live(self) -> list[str]:
        """The pods that count: known, with no gone evidence since last confirmed."""
        return [name for name, record in self.pods.items() if record.gone_since is None]

    @_locked
    def knows(self, pod: str) -> bool:
        """Whether ``pod`` was ever learned (and is remembered: live, or recently gone)."""
        return pod in self.pods

    @_locked
    def complete(self) -> bool:
        """Whether fresh connections say no pod exists beyond the live ones: the ``m`` in a row
        since the last new pod would all have missed one more with ``(n / (n + 1)) ** m`` below
        ``confidence`` (n live pods)."""
        live = len(self.live())
        return live > 0 and self._run >= misses_to_forget(live + 1, self.confidence)

    @_locked
    def down(self) -> frozenset[str]:
        """Pods with gone evidence, still remembered."""
        return frozenset(n for n, r in self.pods.items() if r.gone_since is not None)

    @_locked
    def count(self, now: float) -> int:
        """How many pods the target has, by the evidence and the hints evidence has not
        overruled."""
        live = len(self.live())
        self._judge(self._expected, live, now, patience=self.hint_patience_s, warn=True)
        self._judge(self._called, live, now, patience=0.0, warn=False)
        self._forget_gone(now)
        return self._count()

    @_locked
    def expected(self) -> int | None:
        """The ``expected_pods`` hint, None if there is none or evidence overruled it."""
        hint = self._expected
        return None if hint.overruled else hint.pods

    @_locked
    def take_notices(self) -> list[str]:
        """Warnings to log once each (a hint overruled), and forget them."""
        notices, self._notices = self._notices, []
        return notices

    # -- internals ---------------------------------------------------------------------------

    def _count(self) -> int:
        hints = [
            hint.pods for hint in (self._expected, self._called) if hint.pods and not hint.overruled
        ]
        return max([len(self.live()), *hints])

    def _contradicts(self, hint: int, live: int) -> bool:
        """Whether the fresh connections since the last new pod say there are not ``hint``."""
        if live > hint:
            return True
        if live == hint or live == 0 or len(self._run_pods) < 2:
            return False
        return (live / hint) ** self._run < self.confidence

    def _judge(self, hint: _Hint, live: int, now: float, *, patience: float, warn: bool) -> None:
        if hint.pods is None or hint.overruled:
            return
        if not self._contradicts(hint.pods, live):
            hint.contradicted_since = None
            return
        if hint.contradicted_since is None:
            hint.contradicted_since = now
        if now - hint.contradicted_since < patience:
            return
        hint.overruled = True
        if warn:
            self._notices.append(
                f"expected_pods={hint.pods} but fresh connections found {live} pods for "
                f"{patience:g} s: the Deployment was probably scaled; following the "
                f"{live} pods found (update expected_pods)"
            )

    def _drop(self, pod: str, why: str) -> None:
        del self.pods[pod]
        self.version += 1
        self.dropped = [*self.dropped[-31:], (pod, why)]

    def _forget_gone(self, now: float) -> None:
        for name, record in list(self.pods.items()):
            if record.gone_since is not None and now - record.gone_since >= self.forget_gone_s:
                self._drop(name, record.gone_cause or "gone")
