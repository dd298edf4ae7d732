"""The lane pool's bookkeeping: which lanes exist, which take calls, what to dial, drain and close.

Pure (no gRPC): the sync and asyncio channels share it. Every change happens under one lock, in
this class; :meth:`LanePool.plan` returns what the adapter must do (open connections and check
them, health-check lanes, close connections) and the adapter does it outside the lock, then
reports back with :meth:`LanePool.checked` (httpcore's connection-pool style).

The life of a lane: ``plan`` creates it (DIALING) and hands it to the adapter (CHECKING), which
opens its connection and makes one health check that names the pod (a name never seen before is
believed once a second check, which :meth:`LanePool.confirmations` asks for, names it too: a pod
that names itself anew on every call is no new pod each time); ``checked`` then keeps it
(ACTIVE) or, if it reached a pod another lane covers while a pod no lane covers is known, closes it
and plans a redial, at most ``redials`` times per slot (kube-proxy picks at random: 3 connections
reach 3 distinct pods only 22 % of the time). A lane due for rotation gets a replacement first;
the old lane drains (no new calls) once the replacement is active, and closes when idle or after
``drain_grace_s``. A lane whose calls pass their deadlines while other lanes answer is suspect (no
new calls) until a health check, in the next round, keeps or drains it. A scout, every
``scout_interval_s``, is a fresh connection kept only if it reached a pod no lane covers: that is
how pods added by a scale-up get traffic within seconds.
A lane or scout kept for a pod never seen before (the start, when no pod is known, or a
scale-up, which seldom adds one pod alone) starts a burst: more scouts at once, several a round,
so the pods beyond the lanes' first picks are found in the same second instead of one random
draw per interval each.

When the pods name themselves nowhere (servers without the server half: every check answers
and none names a pod), the pool cannot tell its lanes' pods apart: it balances **blind** (see
:attr:`PoolConfig.blind_lanes`): more lanes, re-rolled one at a time on a short period so each
pod's share of the calls averages out, and no scout (a scout is kept only for a pod it can
name). A check that names a pod ends it.

When fresh connections keep reaching one pod while more pods are known (Service
``sessionAffinity: ClientIP``), or an L7 proxy balances per request, rotating cannot help: the
pool stops redialling and says why in :attr:`LanePool.stuck`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from grpc_balance_mw._membership import Membership, Source
from grpc_balance_mw.affinity.advice import VOICES, cause_of_stuck
from grpc_balance_mw.errors import BalanceError, ConfigurationError
from grpc_balance_mw.orca import LoadReport
from grpc_balance_mw.pool.lane import Lane, LanePurpose, LaneState
from grpc_balance_mw.pool.outliers import OutlierDetection, OutlierEjector, OutlierEvent
from grpc_balance_mw.pool.pickers import Picker, Weighted
from grpc_balance_mw.pool.rotation import (
    Rotation,
    RotationContext,
    rotate_after_age,
    rotate_on_alarm,
    rotate_when_pod_gone,
)
from grpc_balance_mw.subset import LoadBook, SubsetRule

__all__ = [
    "CheckResult",
    "LanePool",
    "NoLane",
    "Plan",
    "PoolClosed",
    "PoolConfig",
    "Signals",
    "Stuck",
    "default_rotation",
    "pool_for_channel",
]

Clock = Callable[[], float]
#: Stuck causes where every fresh connection reaches one pod; a scout that reaches another ends
#: them.
_SAME_POD = frozenset({"session-affinity", "one-pod-or-client-ip"})
#: Reasons that mean a lane is broken, not merely due: these still rotate while stuck.
_BROKEN = frozenset({"unavailable", "pod down"})
#: Failed dials back off up to this. Low, because it is also how long after an outage ends (the
#: Service restarted, every pod briefly gone) the first new lane can be active again: with 5 s,
#: calls kept failing for up to 5 s after the Service was back. A failed dial costs one
#: refused connection.
_MAX_BACKOFF_S = 1.0
#: Health checks in a row, on new lanes and scouts, that answer SERVING and name no pod while no
#: pod is known, before the pool balances blind: the first lanes and a second of scouts. A pod
#: that stamps its identity names itself on every check, so this never happens by chance.
_BLIND_AFTER = 6
#: Blind re-rolls dialled in one round at most (the periods due since the last round).
_REROLL_WIDTH = 4
#: How long a pod's reported connections count towards the mean (``PoolConfig.subset``): a
#: pod's count drifts as clients come and go, and the pods a client reached long ago say
#: little of the fleet now.
_LOAD_TTL_S = 30.0
#: Scouts of a burst dialled in one round: a few connections at once, not dozens.
_BURST_WIDTH = 4
#: While the channel is idle and its scouting backed off, the adapter plans at most this far
#: apart (not every tick), and the affinity detector is asked for its signals at most this
#: often: an idle channel's rounds are most of its idle CPU. The first call made in between
#: wakes the adapter (``LanePool.on_wake``), so the pace comes back with it, not a round later.
_IDLE_ROUND_S = 5.0
_IDLE_SIGNALS_S = 5.0
#: ... and its lanes are health-checked this often instead of every ``health_interval_s`` (a
#: third of its idle CPU went to checks). The first round that sees a call checks every lane
#: not checked within ``health_interval_s``, before the next calls if it can.
_IDLE_CHECK_S = 20.0
#: A pod first seen this long after the pool's first lane took calls joined the target (a
#: scale-up): slow start ramps its share. The pods found before are the target's own, found
#: by the first scouts within a second or two, and start with full shares.
JOINED_AFTER_S = 5.0


class PoolClosed(BalanceError, ValueError):
    """A call was made on a closed balanced channel (grpcio raises ValueError there too)."""


class NoLane(PoolClosed):
    """No lane has a connection now (every dial is failing, e.g. the target's name does not
    resolve or its TLS name does not match). The channel adapters fail the call with UNAVAILABLE,
    as a grpc channel without a connection does, so a retry policy can send it again."""


def default_rotation() -> Rotation:
    """Every 60 s (+/- 20 %), on the affinity alarm, and when a lane's pod goes away."""
    return rotate_after_age(60.0) | rotate_on_alarm() | rotate_when_pod_gone()


@dataclass(frozen=True)
class PoolConfig:
    """How many lanes, how hard to look for pods, how long to drain. Defaults and why:

    Attributes:
        min_lanes: lanes kept at least (3: the smallest spread that survives losing one pod).
        max_lanes: lanes kept at most when following the pods.
        follow_pods: keep one lane per known pod, between ``min_lanes`` and ``max_lanes``.
        expected_pods: the pods the target should have, if known; helps coverage at start.
        redials: per slot, how many times a lane that reached an already covered pod is
            dialled again before the duplicate is accepted (6: with 3 pods and 2 covered, the
            third is missed 6 times in a row 9 % of the time; each dial costs ~2 ms). A slot
            whose redials are all spent so starts a burst of scouts (see ``burst_per_pod``).
        drain_grace_s: a draining lane is closed after this even if calls are still on it
            (30 s, Kubernetes' default termination grace); set it above your longest stream.
        scout_interval_s: a fresh connection is made this often to look for pods no lane covers
            (0.25 s: four short connections a second, each a TCP and HTTP/2 handshake and one
            health check; measured on loopback, an idle channel's client process spent 10 ms
            of CPU a second with it, 6 ms with 0.5 s, 2 ms without scouts). 0.5 halves the
            cost; both new pods of a 3 -> 5 scale-up then miss 5 s 1.1 % of the time (see
            ``burst_per_pod``). None: no scouting (new pods then wait for rotation).
        scout_idle_max_s: while the channel makes no calls and every scout reaches a pod
            already known and covered, the scout interval doubles after each scout up to this
            (32 s): an idle channel then dials one scout every 32 s instead of four a second (a
            scout costs its client about 7 ms of CPU: at 8 s the scouts were half of an idle
            channel's CPU). It returns to ``scout_interval_s`` at once when a call is made, a
            scout finds a pod no lane covers, a health check fails, a lane's pod goes away or
            its lane reconnects to another pod. The trade-off: a scale-up that happens while
            the channel makes no calls is found within the usual bound of the first calls after
            it, not of the scale-up itself; a channel carrying calls keeps the fast pace, and
            with it the scale-up bound below. While idle the maintenance rounds run at most 5 s
            apart (the first call wakes them at once: ``LanePool.on_wake``) and no lane is
            rotated by age; once backed off all the way, lanes are health-checked every 20 s
            (the first round that sees a call checks the lanes due). Scouting backs off only
            once the lanes have settled (every live pod has a lane, none doubled unless another
            pod is unlikely). None: no back-off.
        burst_per_pod: a lane or scout kept for a pod never seen before starts a burst of
            ``burst_per_pod * (pods known + 1)`` scouts (pods known counted up to
            ``max_lanes``), 4 a round, rounds back to back; a scout in the burst that finds
            another new pod starts a new one; it ends early once no lane is left for a new pod
            (``max_lanes`` reached and no pod doubled). If one more pod exists (n = pods known
            + 1), a burst misses it with probability ``(1 - 1/n) ** (5 n)``, below ``e ** -5``
            = 0.7 % whatever n. Cost: once at the start (20 short connections for 3 pods; without
            it, with default options, a fourth pod waited a median 0.5 s for a lane, 1 start in
            10 over 2 s), and after a scale-up (or a pod back under a new name), at
            most ``5 * (max_lanes + 1)`` = 45 connections per pod found, 55 for 3 -> 5 pods, in
            well under a second. A slot whose ``redials`` all reached covered pods while
            fewer pods are covered than lanes wanted starts one too: bad luck or no pod left,
            which the burst tells apart in a round or two. Every burst ends once the fresh
            connections since the last new pod make one more unlikely (the ``confidence`` of
            :class:`Membership`). 0: no bursts.

            The arithmetic for a scale-up from 3 to 5 pods (3 lanes, defaults), leaving 0.5 s
            of the 5 s for the check and the first call: a scout reaches one of the 2 new pods
            with p = 2/5, so the ~18 scouts of 4.5 s all miss both with p = 0.6 ** 18 = 0.01 %.
            The burst after the first find (5 * (4 + 1) = 25 scouts, each reaching the other
            new pod with p = 1/5) misses it with p = 0.8 ** 25 = 0.38 %, and then the regular
            scouts left before 4.5 s must miss it too. Summed over when the first is found: a
            new pod is still unserved 5 s after the scale-up with p = 0.024 % (2 s after it:
            4.8 %, nearly all of it the first find; 0.5 s scouts: 1.1 % and 22 %). With one
            scout every 0.5 s and no burst, it was 21 % (the second new pod is a coupon
            collector's tail). ``tests/test_pool_scouting.py`` simulates it.
        health_interval_s: each active lane's pod is health-checked this often (NOT_SERVING or a
            reconnect to another pod is noticed within it).
        pod_ttl_s: how long a pod found gone (NOT_SERVING, its connections refused or
            dropped) is remembered as gone, so lanes that reach it again are rotated. Pods
            are no longer forgotten by time: they leave on evidence (see
            :mod:`grpc_balance_mw._membership`; :attr:`LanePool.membership`).
        affinity_dials: this many fresh connections in a row reaching one pod while more pods are
            known means Service sessionAffinity (16: with 2 random pods that happens by chance
            once in 32,768 runs of 16 dials); with no other pod known, it means one ready pod or
            ClientIP hiding the others. Either way redialling stops (a scout every
            ``stuck_recheck_s`` looks again: a scale-up of a one-pod Service is found then).
        stuck_recheck_s: while stuck, one scout this often checks whether that is still so.
        unanswered_checks: an active lane whose health checks go unanswered this many times in
            a row (its pod accepts connections but hangs: stopped, deadlocked, out of threads) is
            drained and replaced (2: one lost check during a reconnect is forgiven). Sooner if
            its calls pass their deadlines while other lanes answer: it is then suspect at once,
            and one unanswered check drains it (see :meth:`LanePool.release`).
        outlier_detection: when a pod whose calls fail while its health checks say SERVING
            (a gray failure) is ejected: its lanes take no calls for a while (gRFC A50, see
            :class:`~grpc_balance_mw.pool.outliers.OutlierDetection`). None: never.
        blind_lanes: lanes kept while balancing blind (8): when new lanes' and scouts' health
            checks answer and name no pod (servers that stamp no identity), the pool cannot
            tell pods apart, so it dials no scout (it could never learn what a scout found)
            and keeps this many lanes instead, each on a pod picked at random by the Service.
            A check that names a pod ends blind balancing (the servers adopted the server half).
        blind_reroll_s: while blind, one lane (the oldest) is re-rolled this often: a
            replacement is dialled, and the old lane drains once it is active, as rotation
            does. Each re-roll is a fresh random draw of a pod, so over a window of ``W``
            seconds a pod's share averages ``M = W / blind_reroll_s`` draws of equal weight
            (each of the ``L`` lanes lives ``L * blind_reroll_s`` and takes ``1 / L`` of the
            calls: the share depends on ``M`` only; the lanes smooth it within the window).
            With ``n`` pods of equal speed a pod's share over fair is ``n * Binomial(M, 1/n) /
            M``: mean 1, standard deviation ``sqrt((n - 1) / M)``. Default 0.125 s: ``M = 480``
            draws a minute; with 3 pods the standard deviation is 0.065, the max share over
            fair of one 60 s window averages 1.07 (99th percentile 1.16), and the worst of
            the 13 windows (5 s apart) of a 2-minute run has a median of 1.11, 95th percentile
            1.17, above 1.25 in 0.2 % of runs (a simulation of this model; the measured
            figures are in docs/identity.md). 0.25 s halves the cost and gives 1.15, 1.25 and
            5 %; the bound grows with the pods (``n - 1`` above). Cost: 8 connections a second,
            twice the scouting they replace, each a TCP and HTTP/2 handshake and one health
            check, and each carries calls. Only while calls are made: an idle channel
            re-rolls nothing; and while ``blind_lanes`` old lanes still drain (long streams
            hold them up to ``drain_grace_s``), re-rolls wait: at most twice ``blind_lanes``
            connections are open. None: lanes are not re-rolled (they land by chance).
        subset: keep the pods' connections even across many clients (None: off). With a
            rule, the pool reads the client connections each pod reports in its health
            checks' load report (the server half's ``load_meter`` sends it): a new lane on a
            pod holding more than the rule's share of the mean it has seen is redialled
            (within ``redials``, as a duplicate is), and an active lane on a pod far above the
            mean is rotated away with the rule's probability, at most one a round. Turn it on
            with many client replicas and few lanes each (``max_lanes`` below the pods), where
            kube-proxy's random picks would otherwise leave some pods with far more
            connections, and load, than others; pods that send no report change nothing.
    """

    min_lanes: int = 3
    max_lanes: int = 8
    follow_pods: bool = True
    expected_pods: int | None = None
    redials: int = 6
    drain_grace_s: float = 30.0
    scout_interval_s: float | None = 0.25
    scout_idle_max_s: float | None = 32.0
    burst_per_pod: int = 5
    health_interval_s: float = 5.0
    pod_ttl_s: float = 30.0
    affinity_dials: int = 16
    stuck_recheck_s: float = 30.0
    unanswered_checks: int = 2
    outlier_detection: OutlierDetection | None = field(default_factory=OutlierDetection)
    blind_lanes: int = 8
    blind_reroll_s: float | None = 0.125
    subset: SubsetRule | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_lanes <= self.max_lanes:
            raise ConfigurationError(
                f"need 1 <= min_lanes <= max_lanes, got {self.min_lanes} and {self.max_lanes}"
            )
        if (
            self.redials < 0
            or self.burst_per_pod < 0
            or self.affinity_dials < 2
            or self.unanswered_checks < 1
        ):
            raise ConfigurationError(
                "need redials >= 0, burst_per_pod >= 0, affinity_dials >= 2 and "
                "unanswered_checks >= 1"
            )
        if self.drain_grace_s < 0 or self.health_interval_s <= 0 or self.pod_ttl_s <= 0:
            raise ConfigurationError("need drain_grace_s >= 0, health_interval_s, pod_ttl_s > 0")
        if self.scout_interval_s is not None and self.scout_interval_s <= 0:
            raise ConfigurationError("scout_interval_s must be > 0 or None")
        if self.scout_idle_max_s is not None and self.scout_idle_max_s <= 0:
            raise ConfigurationError("scout_idle_max_s must be > 0 or None")
        if self.blind_lanes < 1 or (self.blind_reroll_s is not None and self.blind_reroll_s <= 0):
            raise ConfigurationError("need blind_lanes >= 1 and blind_reroll_s > 0 or None")


@dataclass(frozen=True)
class Signals:
    """What the adapter knows from outside the pool (the affinity detector's snapshot).

    Attributes:
        alarm: the detector's state value (``"pinned"``, ``"skewed"``, ``"l7-balanced"``...).
        top_pod: the pod with the largest share in its window.
        known_pods: how many pods the detector believes exist.
    """

    alarm: str | None = None
    top_pod: str | None = None
    known_pods: int = 0


@dataclass(frozen=True)
class CheckResult:
    """What a health check on a lane's connection said.

    Attributes:
        reachable: the check got an answer from a pod (any status the pod sent).
        pod: the pod named in the answer's identity header, None if it named none.
        serving: the pod said SERVING (False: NOT_SERVING, or it answered with an error).
        fault: why an answer was not believed (a reply that is no health status), for the
            adapter's log; None otherwise.
        connections: the client connections the pod reported holding (its load report's
            ``connections``), None if it sent no report.
    """

    reachable: bool
    pod: str | None = None
    serving: bool = True
    fault: str | None = None
    connections: float | None = None


@dataclass(frozen=True)
class Stuck:
    """Rotation cannot spread the calls; the adapters warn with :attr:`message`.

    Attributes:
        cause: ``"session-affinity"`` (every fresh connection reached one pod while more are
            known), ``"one-pod-or-client-ip"`` (the same with no other pod known: one ready
            pod, or ClientIP affinity hiding the others) or ``"l7-proxy"``.
        pod: the pod every fresh connection reached.
        dials: fresh connections in a row that reached it.
        known_pods: pods known to exist at the time.
        since: when it was recognised (the pool's clock).
    """

    cause: str
    pod: str | None
    dials: int
    known_pods: int
    since: float

    @property
    def message(self) -> str:
        """The table's cause and fix (``affinity.advice.VOICES``), as every part says them."""
        voice = VOICES[cause_of_stuck(self.cause)]
        if self.cause == "l7-proxy":
            seen = "the balanced channel stops rotating lanes (they cannot help and are not needed)"
        elif self.cause == "one-pod-or-client-ip":
            seen = (
                f"{self.dials} fresh connections in a row reached pod {self.pod} and no other "
                "pod is known; redialling stops"
            )
        else:
            seen = (
                f"{self.dials} fresh connections in a row reached pod {self.pod} while "
                f"{self.known_pods} pods are known; redialling stops"
            )
        return f"{seen}. Cause: {voice.cause}. Fix: {voice.fix}"


@dataclass
class Plan:
    """What the adapter does next, outside the lock.

    Attributes:
        dial: new lanes: open a connection, store it in ``lane.connection``, health-check it
            and report with :meth:`LanePool.checked`.
        check: active lanes whose pod is due for a health check (report the same way).
        drain: lanes that stopped taking calls in this round (for logs).
        close: lanes whose connection to close now.
        stuck: set when the pool became stuck in this round (for one warning).
        outliers: pods ejected or returned since the last round (log each at its ``level``).
        notices: warnings to log once (e.g. ``expected_pods`` overruled by the evidence).
        idle_s: set while the channel is idle and nothing is due sooner: how long the adapter
            may wait before the next round (see :meth:`pause`).
    """

    dial: list[Lane] = field(default_factory=list)
    check: list[Lane] = field(default_factory=list)
    drain: list[Lane] = field(default_factory=list)
    close: list[Lane] = field(default_factory=list)
    stuck: Stuck | None = None
    notices: list[str] = field(default_factory=list)
    outliers: list[OutlierEvent] = field(default_factory=list)
    idle_s: float | None = None

    def pause(self, tick_s: float) -> float:
        """How long the adapter waits before the next round: its tick, or longer while idle."""
        return max(tick_s, self.idle_s or 0.0)

    def __bool__(self) -> bool:
        return bool(self.dial or self.check or self.close)

    def warnings(self) -> list[str]:
        """What the adapter logs at WARNING level for this round (each said once)."""
        stuck = [self.stuck.message] if self.stuck is not None else []
        return [*stuck, *self.notices]


class LanePool:
    """The lanes of one balanced channel.

    Args:
        config: sizes, bounds and intervals.
        picker: chooses the lane per call (default :class:`Weighted`: by the pods' load
            reports when they send them, else exactly :class:`LeastOutstanding`).
        rotation: when a lane is replaced (default :func:`default_rotation`).
        clock: monotonic seconds (injected in tests).
        rng: random source for jitter (injected in tests).
    """

    def __init__(
        self,
        config: PoolConfig | None = None,
        *,
        picker: Picker | None = None,
        rotation: Rotation | None = None,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config if config is not None else PoolConfig()
        self.picker: Picker = picker if picker is not None else Weighted(rng=rng)
        #: Where load reports go (a picker that weighs lanes by them), else None: then the
        #: calls' trailers are not read for reports at all.
        self._on_report: Callable[[Lane, LoadReport, float], None] | None = (
            getattr(self.picker, "reported", None)
            if getattr(self.picker, "reads_reports", False)
            else None
        )
        #: Whether its picker weighs lanes by the pods' load reports (so the calls' trailers
        #: are read for them); a plain attribute, read on every call.
        self.reads_reports = self._on_report is not None
        #: Where calls' latencies go (a picker that weighs lanes by them), else None.
        self._on_timed: Callable[[Lane, float, float], None] | None = (
            getattr(self.picker, "timed", None)
            if getattr(self.picker, "times_calls", False)
            else None
        )
        #: Whether its picker weighs lanes by their calls' latency (so calls are timed).
        self.times_calls = self._on_timed is not None
        #: Told when a lane for a pod that joined after the start begins to take calls.
        joined = getattr(self.picker, "joined", None)
        self._on_joined: Callable[[Lane, float], None] | None = joined if callable(joined) else None
        #: Load reports that could not be decoded (dropped; the calls went on).
        self.malformed_reports = 0
        self.rotation = rotation if rotation is not None else default_rotation()
        self.clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._lock = threading.Lock()
        self._ids = 0
        self._picks = 0
        self.lanes: list[Lane] = []  # every lane not yet handed back for closing
        self._available: list[Lane] = []
        self._to_close: list[Lane] = []
        self._drained: list[Lane] = []
        #: The pods behind the target, from evidence (see :mod:`grpc_balance_mw._membership`).
        self.membership = Membership(forget_gone_s=self.config.pod_ttl_s)
        self.membership.expect(self.config.expected_pods)
        self._now = 0.0  # the clock at the last plan or report, for the membership's count
        #: The clock at the last plan: a clock for the call path that costs no call.
        self.planned_at = 0.0
        self._recent: deque[str] = deque(maxlen=self.config.affinity_dials)
        self._checked_at: dict[int, float] = {}
        self._answers = 0  # calls answered on any lane (see Lane.heard)
        self._to_confirm: list[Lane] = []  # new lanes whose pod's name needs a second check
        self._renamed_at: float | None = None  # when a pod last named itself anew
        self._next_scout = 0.0
        self._scout_pace = self.config.scout_interval_s or 0.0  # backs off while idle, stable
        self._picks_at_scout = 0  # calls picked when the last scout was dialled
        self._picks_at_plan = 0  # ... when the last round was planned
        self._picks_at_signals = -1  # ... when the detector was last asked
        #: Called (under the pool's lock, so it must only set a flag or an event) by the first
        #: call after a round that let the adapter wait longer (``Plan.idle_s``): the adapter
        #: sets it to wake its maintenance at once.
        self.on_wake: Callable[[], object] | None = None
        self._dozing = False  # the last round let the adapter wait: the next call wakes it
        self._signals_at = 0.0
        self._burst = 0  # scouts left in the current burst
        self._next_dial = 0.0
        self._backoff = 0.0  # after dials that reached no serving pod
        self._drain_backoff = 0.0  # after lanes drained for UNAVAILABLE
        self._signals = Signals()
        self.stuck: Stuck | None = None
        self._new_stuck: Stuck | None = None
        detection = self.config.outlier_detection
        #: Outlier ejection's state (None: off); its ``ejected`` are the pods ejected now.
        self.outliers = OutlierEjector(detection) if detection is not None else None
        self._ejected: set[str] = self.outliers.ejected if self.outliers is not None else set()
        #: The pods name themselves nowhere: lanes balance blind (see ``PoolConfig.blind_lanes``).
        self.blind = False
        self._unnamed = 0  # new lanes' and scouts' checks in a row that named no pod
        self._next_reroll = 0.0
        self._started_at: float | None = None  # when the first lane took calls
        self.closed = False
        #: Set in a forked child: the adapter refuses calls (its connections are the parent's).
        self.forked = False
        #: Counters for tests, logs and benchmarks.
        self.dials = 0
        self.redials = 0
        self.rotations = 0
        self.rerolls = 0  # blind re-rolls (also counted in rotations)
        #: The pods' reported connections, for ``PoolConfig.subset`` (kept whatever the rule).
        self.load_book = LoadBook(ttl_s=_LOAD_TTL_S)
        self._rounds = 0  # rounds planned, so that at most one lane leaves a crowded pod a round
        self._left_round = -1
        self.crowded = 0  # new lanes redialled, and lanes rotated, away from crowded pods
        self.left_crowded = 0  # of which lanes rotated away from a crowded pod
        self.evened = 0  # lanes moved to a pod holding fewer connections

    def __repr__(self) -> str:
        with self._lock:
            live = [lane for lane in self.lanes if not lane.is_closed()]
            counts = Counter(lane.state.value for lane in live)
            parts = [
                f"{counts[state.value]} {state.value}" for state in LaneState if counts[state.value]
            ]
            summary = f"{len(live)} lanes: {', '.join(parts)}" if parts else "0 lanes"
            if self.stuck is not None:
                summary += f"; stuck ({self.stuck.cause})"
            if self.blind:
                summary += "; blind (no pod named)"
            if self.closed:
                summary += "; closed"
            return f"<LanePool {summary}>"

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock (the parent's may have been held at the fork)."""
        self._lock = threading.Lock()
        self.forked = True

    # -- the call path -------------------------------------------------------------------------

    def acquire(self) -> Lane:
        """The lane for one call; its in-flight count is raised until :meth:`release`.

        Without an active lane (at start, or every lane broken), a lane still being checked or
        draining takes the call rather than failing it.

        Raises:
            PoolClosed: the pool is closed.
        """
        with self._lock:
            lanes = self._available
            if not lanes:
                lanes = self._fallback()
            elif self._ejected:  # lanes of ejected pods wait, unless every lane's is ejected
                ejected = self._ejected
                lanes = [lane for lane in lanes if _endpoint(lane) not in ejected] or lanes
            lane = self.picker(lanes)
            self._picks += 1
            lane.last_picked = self._picks
            lane.in_flight += 1
            lane.calls += 1
            if self._dozing:
                self._wake()
            return lane

    def release(
        self,
        lane: Lane,
        unavailable: bool = False,
        *,
        timed_out: bool = False,
        failed: bool = False,
        report: LoadReport | None = None,
        started: float | None = None,
    ) -> None:
        """A call on ``lane`` ended.

        Args:
            lane: the lane :meth:`acquire` gave the call.
            unavailable: it failed with UNAVAILABLE and no pod sent that status (the pod or
                its connection went away): the lane takes no more calls and is replaced.
            timed_out: it failed with DEADLINE_EXCEEDED. If other lanes answered calls since
                this lane last did, its pod may hang (stopped, deadlocked, out of threads: the
                connection stays open and nothing answers): the lane becomes suspect, takes no
                new calls, and is health-checked in the next round, which keeps it or drains it.
                Waiting for its periodic checks instead cost a burst of calls per deadline: its
                stuck calls expire together, its in-flight count drops to 0, and the picker
                sends it a fresh burst. It also counts against its pod for outlier ejection.
            failed: it failed with a status its pod is to blame for (``Outcome.pod_failed``):
                counted for outlier ejection; several in a row eject the pod at once.
            report: the load report its pod sent in the call's trailers, for the picker.
            started: when it started (this pool's clock), if timed: its latency goes to the
                picker (only calls that succeeded are timed).
        """
        with self._lock:
            lane.in_flight -= 1
            if report is not None or started is not None:
                now = self.clock()
                if report is not None and self._on_report is not None:
                    self._on_report(lane, report, now)
                if started is not None and self._on_timed is not None:
                    self._on_timed(lane, now - started, now)
            if unavailable:
                self._failed(lane)
            elif timed_out:
                if self._answers > lane.heard:  # others answered: this pod's fault
                    self._pod_failed(lane)
                self._timed_out(lane)
            elif failed:
                self._pod_failed(lane)
            else:
                self._answers += 1
                lane.heard = self._answers
                lane.answered += 1
                self._drain_backoff = 0.0

    def lane_failed(self, lane: Lane) -> None:
        """A call on ``lane`` failed with UNAVAILABLE, learnt after :meth:`release`."""
        with self._lock:
            self._failed(lane)

    def _failed(self, lane: Lane) -> None:
        lane.unavailable += 1
        if lane.state is LaneState.ACTIVE:
            now = self.clock()
            self._quicken(now)
            self._drain(lane, now, "unavailable")
            if lane.pod is not None:
                self._pod_down(lane.pod, now, "its calls failed UNAVAILABLE")
            # The first replacement is dialled at once (a pod was killed); the next ones wait,
            # longer after each such drain until a call is answered again: a sidecar that
            # answers every call UNAVAILABLE itself ("no healthy upstream", no pod named) would
            # otherwise cost a new connection per failed call.
            hold, self._drain_backoff = self._drain_backoff, _longer(self._drain_backoff)
            if hold:
                self._next_dial = max(self._next_dial, now + hold)

    def _pod_failed(self, lane: Lane) -> None:
        """A call its pod is to blame for failed (a counter; an ejection if one too many in a
        row while other lanes answer)."""
        lane.failed += 1
        if self.outliers is None:
            return
        if lane.streak_heard != lane.heard:  # it answered since the last streak: a new one
            lane.streak, lane.streak_heard = 0, lane.heard
        lane.streak += 1
        hosts = {_endpoint(each) for each in self._available} | self._ejected
        if self.outliers.failed_in_row(
            _endpoint(lane), lane.streak, self._answers > lane.heard, len(hosts), self.clock()
        ):
            lane.streak = 0  # back from ejection, it gets as many calls to prove itself

    def _sweep_outliers(self, now: float, plan: Plan) -> None:
        """Outlier ejection's interval (A50's timer) ends in the round after it is due: the
        counts of every lane that takes calls, summed per pod, are judged and reset."""
        outliers = self.outliers
        if outliers is None:
            return
        if outliers.due(now):
            counts: dict[str, tuple[int, int]] = {}
            for lane in self.lanes:
                if lane.state is LaneState.ACTIVE or lane.answered or lane.failed:
                    answered, failed = counts.get(_endpoint(lane), (0, 0))
                    counts[_endpoint(lane)] = (answered + lane.answered, failed + lane.failed)
                    lane.answered = lane.failed = 0
            outliers.sweep(now, counts)
        plan.outliers = outliers.take_events()

    def _timed_out(self, lane: Lane) -> None:
        if lane.state is not LaneState.ACTIVE or lane.suspect or self._answers <= lane.heard:
            return  # no other lane answered since this one last did: not this pod alone
        lane.suspect = True
        self._available.remove(lane)
        self._checked_at.pop(lane.id, None)  # checked in the next round

    def _fallback(self) -> list[Lane]:
        if self.closed:
            raise PoolClosed("the balanced channel is closed")
        # Suspect lanes first: they are active lanes whose pod is only in doubt.
        for wanted in (LaneState.ACTIVE, LaneState.CHECKING, LaneState.DRAINING):
            lanes = [
                lane for lane in self.lanes if lane.state is wanted and lane.connection is not None
            ]
            if lanes:
                return lanes
        raise NoLane("the balanced channel has no lane with a connection yet")

    # -- maintenance ---------------------------------------------------------------------------

    def plan(
        self,
        now: float | None = None,
        signals: Signals | Callable[[], Signals] | None = None,
    ) -> Plan:
        """Decide the next round of work: dials, health checks, drains and closes.

        ``signals`` may be a function (the detector's snapshot costs more than a round): it is
        then asked when calls were made since it last was, or every few seconds."""
        now = self.clock() if now is None else now
        if callable(signals):
            fresh = self._picks != self._picks_at_signals
            if fresh or now - self._signals_at >= _IDLE_SIGNALS_S:
                self._picks_at_signals, self._signals_at = self._picks, now
                signals = signals()
            else:
                signals = None
        with self._lock:
            self._now = self.planned_at = now
            self._rounds += 1
            if signals is not None:
                self._signals = signals
            plan = Plan(dial=[lane for lane in self.lanes if lane.state is LaneState.DIALING])
            if self.closed:
                plan.close, self._to_close = self._to_close, []
                return plan
            if self._picks != self._picks_at_scout:
                self._quicken(now)
            self._expire_pods(now)
            self._drain_renamed(now)
            self._check_l7(now)
            self._rotate(now, plan)
            self._reroll(now, plan)
            self._fill(now, plan)
            self._shrink(now)
            self._scout(now, plan)
            self._finish_drains(now)
            self._sweep_outliers(now, plan)
            for lane in plan.dial:
                lane.state = LaneState.CHECKING
            every = self._check_interval()
            plan.check = [
                lane
                for lane in self._available
                if now - self._checked_at.get(lane.id, now) >= every
            ]
            plan.check += [lane for lane in self._suspects() if lane.id not in self._checked_at]
            plan.check += self._confirmations()
            for lane in plan.check:
                self._checked_at[lane.id] = now
            plan.close, self._to_close = self._to_close, []
            plan.drain, self._drained = self._drained, []
            plan.stuck, self._new_stuck = self._new_stuck, None
            plan.notices = self.membership.take_notices()
            plan.idle_s = self._idle_for(now, plan)
            self._dozing = plan.idle_s is not None
            self._picks_at_plan = self._picks
            return plan

    def share_membership(self, membership: Membership) -> None:
        """Keep the target's pods in ``membership``, the model the target's affinity detector
        judges from (``AffinityDetector.membership``), so the pool and the detector count the
        same pods from both their evidence: the pool's checks and scouts, the detector's calls
        and probe rounds."""
        with self._lock:
            membership.forget_gone_s = self.config.pod_ttl_s
            if self.config.expected_pods is not None:
                membership.expect(self.config.expected_pods)
            self.membership = membership

    def checked(self, lane: Lane, result: CheckResult, now: float | None = None) -> None:
        """Report a health check of ``lane`` (a new lane's first, or an active lane's)."""
        now = self.clock() if now is None else now
        with self._lock:
            self._now = max(self._now, now)
            if result.pod is not None and result.connections is not None:
                self.load_book.record(result.pod, result.connections, now)
            if lane.state is LaneState.CHECKING:
                self._first_check(lane, result, now)
            elif lane.state is LaneState.ACTIVE:
                self._recheck(lane, result, now)

    def confirmations(self) -> list[Lane]:
        """New lanes to check once more before the round ends: their first check named a pod
        never seen, which is believed once a second check on the connection names it too.
        Report them with :meth:`checked` as any check (the adapters ask until none is left)."""
        with self._lock:
            return self._confirmations()

    def _confirmations(self) -> list[Lane]:
        lanes = [lane for lane in self._to_confirm if lane.state is LaneState.CHECKING]
        self._to_confirm = []
        return lanes

    def close(self) -> list[Lane]:
        """Close the pool: every lane whose connection the adapter must close now."""
        with self._lock:
            self.closed = True
            for lane in list(self.lanes):
                self._close(lane, "pool closed")
            self._available = []
            closing, self._to_close = self._to_close, []
            return closing

    # -- internals (all under the lock) ----------------------------------------------------

    def _known(self) -> int:
        # The detector counts every name calls carried: while a pod that renames itself on
        # every call is about, its count is its names, so the pool counts on its own checks.
        signalled = self._signals.known_pods if self._renamed_at is None else 0
        # The detector's count (pods its calls reached) is a hint the evidence overrules: it
        # remembers a pod that left for its own TTL, which kept a lane too many after a
        # scale-down.
        self.membership.called(signalled)
        return self.membership.count(self._now)

    def _covered(self, without: int | None = None) -> set[str]:
        return {lane.pod for lane in self._available if lane.pod is not None and lane.id != without}

    def _wanted(self) -> int:
        if self.blind:
            return max(self.config.blind_lanes, self.config.min_lanes)
        if not self.config.follow_pods:
            return self.config.min_lanes
        return min(max(self._known(), self.config.min_lanes), self.config.max_lanes)

    def _new_lane(
        self, now: float, purpose: LanePurpose, replaces: int | None = None, attempt: int = 0
    ) -> Lane:
        self._ids += 1
        lane = Lane(self._ids, now, purpose=purpose, replaces=replaces, attempt=attempt)
        self.lanes.append(lane)
        self.dials += 1
        if attempt:
            self.redials += 1
        return lane

    def _pending(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.is_pending()]

    def _idle(self) -> bool:
        """No call picked since the last round and none in flight."""
        return self._picks == self._picks_at_plan and not any(
            lane.in_flight for lane in self._available
        )

    def _rotate(self, now: float, plan: Plan) -> None:
        idle = self._idle()
        context = RotationContext(
            now, self._signals.alarm, self._signals.top_pod, self.membership.down()
        )
        being_replaced = {lane.replaces for lane in self._pending()}
        for lane in list(self._available):
            if lane.id in being_replaced:
                continue
            reason = self.rotation.why(lane, context)
            if reason is None or (self.stuck is not None and reason not in _BROKEN):
                continue
            if reason == "age" and (idle or self.blind):
                # Rotating by age re-rolls where calls go: with no calls it only costs dials
                # (a lane and its redials, several a minute). It rotates once calls come.
                # Blind, the re-rolls do it, within their bound on draining lanes.
                continue
            if now < self._next_dial:
                return
            lane.reason = f"rotating: {reason}"
            plan.dial.append(self._new_lane(now, LanePurpose.REPLACE, replaces=lane.id))
            self.rotations += 1

    def _reroll(self, now: float, plan: Plan) -> None:
        """While blind, replace the oldest lane every ``blind_reroll_s``: a fresh connection is
        a fresh random pick of a pod, so the shares average out over a window (the bound is in
        :class:`PoolConfig`). The periods that came due since the last round are re-rolled
        together (rounds may be further apart than the period), the oldest lanes first, at
        most ``_REROLL_WIDTH`` a round. Not while idle (with no calls a re-roll only costs a
        dial; the schedule restarts with the calls), nor while ``blind_lanes`` lanes are still
        draining (long streams: open connections stay within twice the lanes)."""
        every = self.config.blind_reroll_s
        if not self.blind or every is None or self.stuck is not None:
            return
        if self._idle():
            self._next_reroll = max(self._next_reroll, now)
            return
        if now < self._next_reroll or now < self._next_dial:
            return
        pending = self._pending()
        draining = sum(lane.is_draining() for lane in self.lanes)
        if draining >= self._wanted() or any(x.purpose is LanePurpose.REPLACE for x in pending):
            return  # the last re-rolls' replacements are still checked, or old lanes drain
        being_replaced = {lane.replaces for lane in pending}
        lanes = sorted(
            (lane for lane in self._available if lane.id not in being_replaced),
            key=lambda lane: lane.activated_at or 0.0,
        )
        room = self._wanted() - draining
        due = min(_REROLL_WIDTH, len(lanes), room, 1 + int((now - self._next_reroll) / every))
        for oldest in lanes[:due]:
            oldest.reason = "rotating: blind re-roll"
            plan.dial.append(self._new_lane(now, LanePurpose.REPLACE, replaces=oldest.id))
        self.rotations += due
        self.rerolls += due
        self._next_reroll = max(self._next_reroll + due * every, now - every)

    def _suspects(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.suspect and lane.state is LaneState.ACTIVE]

    def _fill(self, now: float, plan: Plan) -> None:
        if now < self._next_dial:
            return
        # A suspect lane keeps its slot: its check, in this round, keeps or drains it.
        missing = (
            self._wanted()
            - len(self._available)
            - len(self._suspects())
            - sum(lane.purpose is LanePurpose.FILL for lane in self._pending())
        )
        for _ in range(missing):
            plan.dial.append(self._new_lane(now, LanePurpose.FILL))

    def _shrink(self, now: float) -> None:
        """Drain lanes beyond the wanted number (e.g. a lane replaced twice: its rotation and its
        failure each brought one), doubled pods first, once nothing is being dialled."""
        if self._pending():
            return
        while len(self._available) > self._wanted():
            victim = self._doubled() or min(self._available, key=lambda lane: lane.id)
            self._drain(victim, now, "surplus")

    def _scout(self, now: float, plan: Plan) -> None:
        interval = self.config.scout_interval_s
        if interval is None or now < self._next_dial or self.blind:
            return  # blind: a scout is kept only for a pod it names, which none does
        if self.stuck is not None:
            self._burst = 0
            if self.stuck.cause == "l7-proxy" or now < self._next_scout:
                return  # the detector says when an L7 proxy is gone
            interval = self.config.stuck_recheck_s
        elif self._pending() or plan.dial:
            return  # lanes being dialled look for pods already (a burst goes on next round)
        elif self._burst and self._room() and not self.membership.complete():
            width = min(self._burst, _BURST_WIDTH)
            self._burst -= width
            plan.dial += [self._new_lane(now, LanePurpose.SCOUT) for _ in range(width)]
            return
        elif now < self._next_scout:
            return
        else:
            interval = self._scout_pace
        self._burst = 0
        self._next_scout = now + interval
        self._picks_at_scout = self._picks
        plan.dial.append(self._new_lane(now, LanePurpose.SCOUT))

    def _wake(self) -> None:
        self._dozing = False
        if self.on_wake is not None:
            self.on_wake()

    def _idle_for(self, now: float, plan: Plan) -> float | None:
        """How long the next round may wait: None (the adapter's tick) unless the channel is
        idle (no call since the last round, none in flight), its scouting backed off, and
        nothing is pending, draining, suspect or stuck."""
        base = self.config.scout_interval_s
        if (
            plan
            or base is None
            or self._scout_pace <= base
            or self._picks != self._picks_at_plan
            or self._burst
            or self.stuck is not None
            or self._to_confirm
            or any(not lane.is_available() or lane.in_flight for lane in self.lanes)
        ):
            return None
        due = [self._next_scout]
        due += [at + self._check_interval() for at in self._checked_at.values()]
        return max(0.0, min(_IDLE_ROUND_S, min(due) - now))

    def _check_interval(self) -> float:
        """``health_interval_s``, or longer once the channel has been idle, its pods stable, long
        enough for its scouting to back off all the way (a few seconds after its last call, its
        lanes are still checked at the usual pace: a lane whose pod went away then is relabelled
        as soon as it would be under calls)."""
        most, every = self.config.scout_idle_max_s, self.config.health_interval_s
        if most is None or self._scout_pace < most or self._picks != self._picks_at_plan:
            return every
        return max(every, _IDLE_CHECK_S)

    def _quicken(self, now: float) -> None:
        """Something changed (or calls are made): scouts at ``scout_interval_s`` again, the
        next one within that interval."""
        base = self.config.scout_interval_s
        if base is None or self._scout_pace <= base:
            return
        self._scout_pace = base
        if self.stuck is None:
            self._next_scout = min(self._next_scout, now + base)

    def _slow_down(self) -> None:
        """A scout found only what was known, and no call was made since it was dialled."""
        most = self.config.scout_idle_max_s
        if most is None or self._picks != self._picks_at_scout or not self._settled():
            return
        self._scout_pace = max(self._scout_pace, min(self._scout_pace * 2, most))

    def _settled(self) -> bool:
        """Whether the lanes cover the pods as well as they can: every live pod known has a lane
        (up to ``max_lanes``) and none doubles a pod, or fresh connections make a pod not yet
        seen unlikely (:meth:`Membership.complete`: e.g. 2 pods and 3 lanes)."""
        live = self.membership.live()
        covered = self._covered()
        most = min(len(live), self.config.max_lanes)
        if len(covered & set(live)) < most:
            return False
        return self._doubled() is None or self.membership.complete()

    def _room(self) -> bool:
        """Could a scout that finds a pod no lane covers get a lane for it?"""
        most = self.config.max_lanes if self.config.follow_pods else self.config.min_lanes
        return len(self._available) < most or self._spare() is not None

    def _burst_size(self) -> int:
        """Scouts in a burst: with the default 5 per pod, one more pod is found with >= 99.3 %."""
        return self.config.burst_per_pod * (min(self._known(), self.config.max_lanes) + 1)

    def _finish_drains(self, now: float) -> None:
        # While no lane is active (every pod unreachable a moment, the Service restarting),
        # the newest draining lane stays open: calls fall back on it (its connection redials
        # by itself) instead of finding no lane at all.
        keep = None
        if not self._available:
            draining = [lane for lane in self.lanes if lane.is_draining()]
            keep = max(draining, key=lambda lane: lane.id) if draining else None
        for lane in list(self.lanes):
            if lane is keep:
                continue
            if lane.is_draining() and (
                lane.is_idle() or lane.drain_expired(now, self.config.drain_grace_s)
            ):
                self._close(lane, lane.reason or "drained")

    def _expire_pods(self, now: float) -> None:
        if self._renamed_at is not None and now - self._renamed_at >= self.config.pod_ttl_s:
            self._renamed_at = None

    def _drain_renamed(self, now: float) -> None:
        """Lanes kept unnamed because their checks named two pods (see ``_renamed``) are drained
        once other lanes' pods keep their names: the renaming is that pod's, not a balancer's."""
        if not self._steady():
            return
        for lane in [lane for lane in self._available if lane.renamed]:
            self._drain(lane, now, "its pod names itself anew on every call")

    def _check_l7(self, now: float) -> None:
        if self._signals.alarm == "l7-balanced":
            if self.stuck is None or self.stuck.cause != "l7-proxy":
                self._set_stuck(Stuck("l7-proxy", None, 0, self._known(), now))
        elif self.stuck is not None and self.stuck.cause == "l7-proxy":
            self.stuck = None
            self._next_scout = now  # scouting resumes at once

    def _set_stuck(self, stuck: Stuck) -> None:
        self.stuck = self._new_stuck = stuck
        self._next_scout = stuck.since + self.config.stuck_recheck_s

    def _first_check(self, lane: Lane, result: CheckResult, now: float) -> None:
        if not result.reachable or not result.serving:
            self._quicken(now)
            if result.pod is not None:
                self._pod_down(result.pod, now)
            self._backoff = _longer(self._backoff)
            self._next_dial = max(self._next_dial, now + self._backoff)
            lane.pod = result.pod
            self._retire(lane, now, "unreachable" if not result.reachable else "not serving")
            return
        pod = result.pod
        if (
            pod is not None
            and lane.claimed is None
            and not self.membership.knows(pod)
            and pod not in self._covered()
        ):
            # A name never seen is believed once a second check on the same connection names
            # it too: a pod that stamps a new name on every call would otherwise count as a
            # new pod on every scout that reaches it (each a burst, a lane, a known pod).
            lane.claimed = pod
            self._to_confirm.append(lane)
            return
        if lane.claimed is not None and pod != lane.claimed:
            pod = self._renamed(lane, now)
            if lane.is_closed() or lane.is_draining():
                return
        self._backoff = 0.0
        lane.pod = pod
        self._named(pod, lane.claimed is not None, now)
        unseen = False
        if pod is not None:
            source = Source.SCOUT if lane.purpose is LanePurpose.SCOUT else Source.LANE
            unseen = self.membership.fresh(pod, source, now, self._covered())
            self._note_dial(pod, now)
        replaced = self._lane(lane.replaces)
        covered = self._covered(without=replaced.id if replaced is not None else None)
        fresh = pod is None or pod not in covered
        if lane.move_from is not None:
            self._moved(lane, replaced, fresh, result, now)
            if unseen and self.stuck is None:
                self._burst = max(self._burst, self._burst_size())
            return
        if lane.purpose is LanePurpose.SCOUT:
            kept = self._scouted(lane, fresh, now)
            if kept and unseen:
                # A pod never seen before: likely a scale-up with more new pods; a burst of
                # scouts finds them now rather than one random draw per interval each.
                self._burst = self._burst_size()
            if kept or unseen:
                self._quicken(now)
            else:
                self._slow_down()
            return
        looking = self.stuck is None and lane.attempt < self.config.redials
        uncovered = self._known() > len(covered) or len(covered) < self._wanted()
        if not fresh and looking and uncovered:
            self._retire(lane, now, f"duplicate of {pod}")
            # The redial is DIALING: the next plan hands it out.
            self._new_lane(now, lane.purpose, lane.replaces, lane.attempt + 1)
            return
        if not fresh and uncovered and self.stuck is None and self._spent(lane):
            # Every redial of this slot reached a covered pod: bad luck (3 pods, 6 redials all
            # miss the third 8.8 % of the time) or no pod left to find. A burst of scouts tells
            # which in a round or two, not one scout per interval (it ends once fresh
            # connections make another pod unlikely, or the affinity rule names the cause).
            self._burst = max(self._burst, self._burst_size())
        crowded = self._crowded_dial(lane, result, now)
        if crowded is not None and looking:
            self._retire(lane, now, crowded)
            self.crowded += 1
            self._new_lane(now, lane.purpose, lane.replaces, lane.attempt + 1)
            return
        self._activate(lane, now)
        if unseen and self.stuck is None:
            # A pod never seen before, now a lane's: the start (no pod was known) or a
            # scale-up. More pods than the lanes reached may exist; a burst looks for them.
            self._burst = max(self._burst, self._burst_size())
        if replaced is not None and replaced.state is LaneState.ACTIVE:
            self._drain(replaced, now, replaced.reason.removeprefix("rotating: ") or "rotated")

    def _spent(self, lane: Lane) -> bool:
        """Whether ``lane`` is the last redial its slot had (none with ``redials=0``)."""
        return 0 < self.config.redials <= lane.attempt

    def _crowded_dial(self, lane: Lane, result: CheckResult, now: float) -> str | None:
        """Why a new lane's pod holds too many connections to keep it (``PoolConfig.subset``),
        or None: no rule, no report, or the rule keeps it (its own ``redials`` spent)."""
        rule = self.config.subset
        if rule is None or result.connections is None or result.pod is None:
            return None
        mean = self.load_book.mean_connections(now)
        # A pod counts a connection from its first call or third health check: this lane's
        # first check (and a new name's confirmation) is not in the count yet.
        held = result.connections + 1
        if rule.accepts(held, mean, lane.attempt):
            return None
        return f"crowded: {held:g} connections, mean {mean:.1f}"

    def _leave_crowded(self, lane: Lane, result: CheckResult, now: float) -> None:
        """An active lane's check: if its pod holds far more connections than the mean, rotate
        the lane away with the rule's probability (a replacement is dialled first, then this one
        drains, as rotation does); if it holds more than the mean and a pod the pool knows of
        holds at least 2 fewer, try to move it there with the rule's smaller probability (kept
        only if a replacement reaches a pod holding fewer: :meth:`_moved`). At most one lane a
        round, never the only one."""
        rule = self.config.subset
        if rule is None or result.connections is None or self.stuck is not None:
            return
        if self._left_round == self._rounds or len(self._available) < 2:
            return
        if any(pending.replaces == lane.id for pending in self._pending()):
            return
        held = result.connections
        mean = self.load_book.mean_connections(now)
        chance = rule.leave_probability(held, mean)
        moving = chance <= 0
        if moving:
            chance = rule.move_probability(held, mean, self.load_book.least_connections(now))
        if chance <= 0 or self._rng.random() >= chance:
            return
        self._left_round = self._rounds
        if moving:
            lane.reason = "rotating: moved to a pod holding fewer connections"
            self._new_lane(now, LanePurpose.REPLACE, replaces=lane.id).move_from = held
            return
        self.crowded += 1
        self.left_crowded += 1
        self.rotations += 1
        lane.reason = "rotating: crowded pod"
        self._new_lane(now, LanePurpose.REPLACE, replaces=lane.id)

    def _moved(
        self, lane: Lane, replaced: Lane | None, fresh: bool, result: CheckResult, now: float
    ) -> None:
        """A move's fresh connection (see :meth:`_leave_crowded`): kept, and the lane it replaces
        drained, only on a pod no other lane holds that holds fewer connections than the
        replaced lane's pod did; else dialled again within the rule's and the pool's redials,
        and then the move is given up: the old lane stays as it was."""
        rule = self.config.subset
        assert rule is not None and lane.move_from is not None
        staying = replaced is not None and replaced.state is LaneState.ACTIVE
        held = None if result.connections is None else result.connections + 1
        mean = self.load_book.mean_connections(now)
        if (
            staying
            and fresh
            and result.pod is not None
            and held is not None
            and rule.improves(held, lane.move_from, mean)
        ):
            assert replaced is not None
            self._activate(lane, now)
            self.evened += 1
            self.rotations += 1
            self._drain(replaced, now, replaced.reason.removeprefix("rotating: "))
            return
        if not fresh:
            why = f"duplicate of {result.pod}"
        elif held is None:
            why = "its pod reports no connections"
        else:
            why = f"not fewer: {held:g} connections against {lane.move_from:g}"
        self._retire(lane, now, why)
        if not staying:
            return
        assert replaced is not None
        if self.stuck is None and lane.attempt < min(rule.redials, self.config.redials):
            again = self._new_lane(now, LanePurpose.REPLACE, lane.replaces, lane.attempt + 1)
            again.move_from = lane.move_from
        else:
            replaced.reason = ""  # the move is given up: the lane stays

    def _renamed(self, lane: Lane, now: float) -> str | None:
        """Two checks on one new connection named two pods. While other lanes' pods keep their
        names, that is one pod naming itself anew on every call (a bug, or a hostile server),
        not a balancer: the lane is not kept, and the names count as no pod. With no such lane
        (an L7 proxy balances every request, the checks included), the lane is kept unnamed,
        and drained once lanes with named pods exist. Returns the pod to record: None."""
        self._renamed_at = now
        if self._steady():
            self._retire(lane, now, "its pod names itself anew on every call")
        else:
            lane.renamed = True
        return None

    def _scouted(self, lane: Lane, fresh: bool, now: float) -> bool:
        """Keep a scout that reached a pod no lane covers; returns whether it was kept."""
        if not fresh or lane.pod is None:
            self._retire(lane, now, "scout found no new pod")
            return False
        if len(self._available) < self._wanted():
            self._activate(lane, now)
            return True
        spare = self._spare()
        if spare is None:
            self._retire(lane, now, "no lane to spare for a new pod")
            return False
        self._activate(lane, now)
        why = f"pod {spare.pod} doubled" if spare.pod is not None else "no pod named"
        self._drain(spare, now, f"{why}, {lane.pod} was not covered")
        return True

    def _steady(self) -> bool:
        """Whether an active lane's pod keeps its name: named by two checks when the lane was
        new, and by every check since. Behind an L7 proxy a lane's checks reach pod after pod
        (two may agree by chance, later ones soon do not)."""
        return any(lane.pod is not None and not lane.moved for lane in self._available)

    def _spare(self) -> Lane | None:
        """The lane a scout's new pod takes over: a doubled pod's, else one whose pod names
        none (a pod a lane can name is worth more than one it cannot tell apart)."""
        doubled = self._doubled()
        if doubled is not None:
            return doubled
        unnamed = [lane for lane in self._available if lane.pod is None]
        return max(unnamed, key=lambda lane: lane.id) if unnamed else None

    def _doubled(self) -> Lane | None:
        """The newest active lane whose pod another active lane covers too."""
        by_pod = Counter(lane.pod for lane in self._available if lane.pod is not None)
        doubled = [lane for lane in self._available if lane.pod and by_pod[lane.pod] > 1]
        return max(doubled, key=lambda lane: lane.id) if doubled else None

    def _recheck(self, lane: Lane, result: CheckResult, now: float) -> None:
        if lane.suspect:
            self._cleared_or_drained(lane, result, now)
            return
        if not result.reachable:
            # One lost check is not a lost pod (a reconnect); several in a row are a pod that
            # hangs, which no call will report as UNAVAILABLE: its calls only time out.
            self._quicken(now)
            lane.unanswered += 1
            if lane.unanswered >= self.config.unanswered_checks:
                self._drain(lane, now, "unresponsive")
                if lane.pod is not None:
                    self._pod_down(lane.pod, now, "its health checks went unanswered")
            return
        lane.unanswered = 0
        if not result.serving:
            if result.pod is not None:
                self._pod_down(result.pod, now)
            return
        if result.pod is not None and not lane.renamed:
            self._named(result.pod, False, now)
            left, moved_before = lane.pod, lane.moved
            lane.moved = lane.moved or result.pod != left
            lane.pod = result.pod  # a reconnect may have reached another pod
            self._reached(result.pod, now)
            if (
                left is not None
                and left != result.pod
                and not moved_before
                and self.stuck is None
                and left not in self._covered()
            ):
                # Its connection to ``left`` ended (GOAWAY, or broken) and the reconnect reached
                # another pod: ``left`` counts again only if found again. (A lane that moves on
                # every check is behind an L7 proxy: that says nothing of the pods.)
                self._pod_down(left, now, f"its lane reconnected to {result.pod}")
            self._leave_crowded(lane, result, now)

    def _cleared_or_drained(self, lane: Lane, result: CheckResult, now: float) -> None:
        """A suspect lane's check: its calls timed out while other lanes answered, so one
        unanswered check is enough to drain it."""
        lane.suspect = False
        if result.reachable and result.serving:
            lane.unanswered = 0
            lane.heard = self._answers  # judged afresh from here
            self._available.append(lane)
            if result.pod is not None:
                lane.pod = result.pod
                self._reached(result.pod, now)
            return
        self._drain(
            lane, now, "unresponsive: calls timed out" if not result.reachable else "not serving"
        )
        pod = result.pod if result.pod is not None else lane.pod
        if pod is not None:
            self._pod_down(pod, now)

    def _named(self, pod: str | None, claimed: bool, now: float) -> None:
        """A check that answered SERVING named ``pod`` (None: no pod; ``claimed``: its names
        disagreed, which is no evidence of unstamped servers). Enough answers in a row that
        name none, while no pod is known, start blind balancing; a name ends it."""
        if pod is not None:
            self._unnamed = 0
            if self.blind:
                self.blind = False
                self._quicken(now)
                self._next_scout = now  # scouting resumes at once; surplus lanes drain
            return
        if claimed or self.blind:
            return
        self._unnamed += 1
        if self._unnamed >= _BLIND_AFTER and not self.membership.live():
            self.blind = True
            self._burst = 0
            self._next_reroll = now + (self.config.blind_reroll_s or 0.0)

    def _reached(self, pod: str, now: float) -> None:
        """A health check on a lane named ``pod``: it exists."""
        self.membership.confirmed(pod, Source.CHECK, now)

    def _note_dial(self, pod: str, now: float) -> None:
        recent = self._recent
        recent.append(pod)
        if self.stuck is not None and self.stuck.cause in _SAME_POD:
            if pod != self.stuck.pod:
                self.stuck = None
                recent.clear()
            return
        if len(recent) == recent.maxlen and len(set(recent)) == 1:
            # Every fresh connection on one pod. Other pods known: the Service's ClientIP
            # affinity. None known: one ready pod, or ClientIP hiding the others; a client
            # cannot tell which, and either way another connection would land there too.
            known = self._known()
            cause = "session-affinity" if known >= 2 else "one-pod-or-client-ip"
            self._set_stuck(Stuck(cause, pod, len(recent), known, now))

    def _pod_down(self, pod: str, now: float, cause: str = "not serving") -> None:
        self.membership.gone(pod, cause, now)
        self._quicken(now)

    def _lane(self, lane_id: int | None) -> Lane | None:
        if lane_id is None:
            return None
        return next((lane for lane in self.lanes if lane.id == lane_id), None)

    def _activate(self, lane: Lane, now: float) -> None:
        if self._started_at is None:
            self._started_at = now
        elif lane.pod is not None:
            record = self.membership.pods.get(lane.pod)
            if record is not None and record.first_seen > self._started_at + JOINED_AFTER_S:
                lane.joined_at = record.first_seen  # a scale-up's pod, for slow start
        lane.state = LaneState.ACTIVE
        lane.activated_at = now
        lane.rotate_at = self.rotation.rotate_at(now, self._rng)
        lane.reason = ""
        lane.heard = self._answers
        self._checked_at[lane.id] = now
        self._available.append(lane)
        if lane.joined_at is not None and self._on_joined is not None:
            self._on_joined(lane, now)

    def _drain(self, lane: Lane, now: float, reason: str) -> None:
        if lane in self._available:
            self._available.remove(lane)
        lane.state = LaneState.DRAINING
        lane.suspect = False
        lane.draining_since = now
        lane.reason = reason
        self._drained.append(lane)

    def _retire(self, lane: Lane, now: float, reason: str) -> None:
        """A new lane that will not be kept: closed, or drained if a call already used it."""
        if lane.is_idle():
            self._close(lane, reason)
        else:
            self._drain(lane, now, reason)

    def _close(self, lane: Lane, reason: str) -> None:
        if lane in self._available:
            self._available.remove(lane)
        lane.state = LaneState.CLOSED
        lane.reason = reason
        self._checked_at.pop(lane.id, None)
        self.lanes.remove(lane)
        self._to_close.append(lane)


def _endpoint(lane: Lane) -> str:
    """What outlier ejection judges a lane's calls as: its pod, or the lane itself."""
    return lane.pod if lane.pod is not None else lane.name


def _longer(backoff: float) -> float:
    """The next backoff after ``backoff``: doubled, from 0.1 s up to ``_MAX_BACKOFF_S``."""
    return min(max(backoff * 2, 0.1), _MAX_BACKOFF_S)


def pool_for_channel(
    *,
    lanes: int,
    max_lanes: int,
    follow_pods: bool,
    expected_pods: int | None,
    pool_config: PoolConfig | None,
    picker: Picker | None,
    rotation: Rotation | None,
) -> LanePool:
    """The pool behind ``balanced_channel()`` / ``aio_balanced_channel()``: ``pool_config`` if
    given, else one made from the channel's few common arguments."""
    if pool_config is None:
        pool_config = PoolConfig(
            min_lanes=lanes,
            max_lanes=max(lanes, max_lanes),
            follow_pods=follow_pods,
            expected_pods=expected_pods,
        )
    return LanePool(pool_config, picker=picker, rotation=rotation)
