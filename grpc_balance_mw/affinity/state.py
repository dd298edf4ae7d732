"""What the detector concludes about a target, and the numbers behind it."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class AffinityState(enum.Enum):
    """How a target's calls are spread over its pods."""

    #: Calls spread over the known pods about evenly.
    BALANCED = "balanced"
    #: One pod (or none) seen and nothing says others exist, or too little seen to judge; also
    #: the state a target returns to when no recent call named a pod (a stale window).
    UNVERIFIED = "unverified"
    #: One pod's share is well above its fair share.
    SKEWED = "skewed"
    #: All or nearly all calls on one pod while two or more pods are known.
    PINNED = "pinned"
    #: Something in front balances every call (an L7 proxy: Envoy, HAProxy, nginx, Linkerd);
    #: the client cannot and need not.
    L7_BALANCED = "l7-balanced"
    #: Calls come back, but none of the window's names its pod: the servers stamp no identity
    #: (or not in the headers the client reads), so nothing can tell how the calls spread.
    UNIDENTIFIED = "unidentified"

    @property
    def is_alarm(self) -> bool:
        return self in (AffinityState.SKEWED, AffinityState.PINNED)


@dataclass(frozen=True)
class PodShare:
    """One pod's part of the window: calls, stream-weighted calls, and share of the weight."""

    calls: int
    weight: float
    share: float


@dataclass(frozen=True)
class AffinitySnapshot:
    """The numbers behind a target's state at one moment.

    Attributes:
        target: the channel target the detector watches.
        state: the current state.
        calls: calls in the window, identified or not.
        unknown_calls: calls in the window whose response named no pod (or a malformed one).
        malformed_calls: calls ever recorded with a malformed pod header.
        pods: per identified pod in the window, its calls, weight and share.
        top_pod: the pod with the largest share, if any call was identified.
        top_share: that pod's share of the identified weight (0.0 when none).
        known_pods: pods known to exist (seen in calls or by the probe, within the TTL).
        known_count: how many pods the detector believes exist: the largest of the known pods,
            the expected count, and the DNS answer's size.
        expected_pods: the configured expected count, if any.
        dns_pods: how many addresses the last DNS answer held (0 when none was given).
        l7_share: share of the window's calls that carried L7 proxy headers.
        warmup_calls: calls ever left out of the window because they came in a channel's
            warm-up (``AffinityConfig.warmup_s``).
        known_pods_dropped: pods ever forgotten because more than
            ``AffinityConfig.max_known_pods`` were known at once (a server that names a new pod
            on every call); 0 when the bound was never hit.
        connections: recent connection samples: each lane's connection, each reconnect, each of
            the probe's dials (calls recorded without a lane count one each).
        connection_pods: per pod, how many of those connections landed on it.
        probe_connections: how many of them the probe dialed.
        lanes: lanes (channels) with calls in the window's time span.
        per_request_lanes: of those, lanes whose consecutive calls switch pods (balanced per
            request by an L7 proxy or the client's round_robin).
        rotated_lanes: lanes whose connection was replaced at least once.
        warming_lanes: lanes still in their warm-up.
        addresses: how many addresses the target stands for (an IP literal: 1; a name: its
            DNS answer's size), None while unknown.
        known_from: how many pods each source knows of: ``calls``, ``probe`` (pods first seen by
            the probe), ``dns``, ``expected``.
        cause: for an alarm (or per-request balancing), why; see :class:`~.advice.Cause`.
        advice: the fix that applies to the cause.
    """

    target: str
    state: AffinityState
    calls: int
    unknown_calls: int
    malformed_calls: int
    pods: Mapping[str, PodShare]
    top_pod: str | None
    top_share: float
    known_pods: tuple[str, ...]
    known_count: int
    expected_pods: int | None
    dns_pods: int
    l7_share: float
    warmup_calls: int = 0
    known_pods_dropped: int = 0
    connections: int = 0
    connection_pods: Mapping[str, int] = field(default_factory=dict)
    probe_connections: int = 0
    lanes: int = 0
    per_request_lanes: int = 0
    rotated_lanes: int = 0
    warming_lanes: int = 0
    addresses: int | None = None
    known_from: Mapping[str, int] = field(default_factory=dict)
    cause: str | None = None
    advice: str | None = None


@dataclass(frozen=True)
class Transition:
    """A state change, with the snapshot taken when it happened.

    Attributes:
        stale: the change is a return to ``UNVERIFIED`` because no call in the window named a
            pod any more (calls stopped and aged out, or stopped being identified), not a
            judgement of calls.
        announced: the detector logged this cause's one-time warning with this change (so
            telemetry need not repeat it at once).
    """

    target: str
    previous: AffinityState
    current: AffinityState
    snapshot: AffinitySnapshot
    stale: bool = False
    announced: bool = False


@dataclass(frozen=True)
class PodEvent:
    """A pod became known (``pod_added``) or stopped being known (``pod_gone``), or the
    balanced channel's outlier ejection ejected it (``pod_ejected``) or returned it
    (``pod_returned``).

    Attributes:
        kind: ``pod_added``, ``pod_gone``, ``pod_ejected`` or ``pod_returned``.
        target: the detector's target.
        pod: the pod's name.
        source: what told. Added: ``calls``, ``probe``, ``lanes`` (a balanced channel's pool,
            which shares the detector's membership model). Gone: ``dns`` (a probe round that
            dialed every address of the DNS answer), ``probe`` (a probe round's fresh
            connections kept missing it), ``unavailable`` (calls on its connection failed
            UNAVAILABLE naming no pod), ``evidence`` (the pool's: NOT_SERVING, unanswered
            checks, scouts that kept missing it) or ``ttl`` (unconfirmed for
            ``known_pods_ttl_s``). Ejected and returned: ``outlier_detection``.
        at: the detector's clock when it happened.
    """

    kind: str
    target: str
    pod: str
    source: str
    at: float
