"""Why a target's calls are uneven (or cannot be judged), and the one fix for that cause.

One table, :data:`VOICES`, holds every situation the package can tell apart, with one sentence
for the cause and one for the fix. Every voice reads it: the detector's snapshot and its
one-time warnings, the telemetry's span events and log lines, the balanced channel's "stuck"
warning (through :data:`STUCK_CAUSES`), and ``grpc-balance doctor``'s verdicts. So a user behind
``sessionAffinity: ClientIP`` hears the same cause and the same fix from all of them, and is never
told to add connections that would all land on the same pod anyway.

Advice names only what exists: a Service setting, a server option, or this package's balanced
channel. A user whose calls already moved onto a balanced channel's lanes
(``observe(..., rebalance=)``) is not told to use one: the alarm then comes from calls made
before the move, still in the window, or from lanes that could not reach distinct pods.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from grpc_balance_mw.affinity.evidence import all_on_one_chance

__all__ = [
    "STUCK_CAUSES",
    "VOICES",
    "Cause",
    "Voice",
    "advice",
    "alarm_cause",
    "cause_of_stuck",
    "one_pod_or_client_ip",
    "say",
]

_BALANCED_CHANNEL = "a balanced channel (grpc_balance_mw.balanced_channel)"


class Cause(enum.Enum):
    """What makes a target's calls uneven, or keeps the package from judging them."""

    #: One connection carries the calls: a ClusterIP Service balanced it once, when it opened.
    SINGLE_CONNECTION = "single_connection"
    #: Every fresh connection lands on the same pod while more are known: the Service's
    #: ``sessionAffinity: ClientIP``.
    SAME_POD_EVERY_CONNECTION = "same_pod_every_connection"
    #: The same, by its name.
    CLIENT_IP = "same_pod_every_connection"
    #: Every fresh connection lands on the same pod and no other pod is known: one ready pod,
    #: or ``sessionAffinity: ClientIP`` hiding the others; nothing a client sees tells which.
    ONE_POD_OR_CLIENT_IP = "one_pod_or_client_ip"
    #: Connections are replaced (server connection age, GOAWAY), yet calls stay uneven.
    ROTATION_SKEWED = "rotation_skewed"
    #: A few long-lived connections, more of them on one pod than chance explains.
    FEW_CONNECTIONS = "few_connections"
    #: Something between balances every call (an L7 proxy, the client's ``round_robin``).
    PER_REQUEST = "per_request"
    #: Calls succeed but no response names its pod: the servers stamp no identity.
    UNIDENTIFIED = "unidentified"
    #: Pods left the Service (a scale-down, a rollout) while the client still counted them.
    PODS_LEAVING = "pods_leaving"


@dataclass(frozen=True)
class Voice:
    """What every part of the package says about one cause.

    Attributes:
        state: the detector state (``AffinityState`` value) the cause goes with.
        cause: why, as a clause that reads after "Cause: ".
        fix: what to do, as a clause that reads after "Fix: ".
        problem: whether the user has something to fix (doctor's exit code 1).
    """

    state: str
    cause: str
    fix: str
    problem: bool = True

    @property
    def sentence(self) -> str:
        """``"Cause: ... Fix: ..."``, the form every log line and verdict ends with."""
        return f"Cause: {self.cause}. Fix: {self.fix}."


_IDENTITY_FIX = (
    "add the server half to the servers (grpc_balance_mw.server.PodIdentityInterceptor, "
    "with add_health), or, if they already send their pod name in a response header, name "
    "that header on the client (ObserveOptions(pod_headers=('x-pod-name',)))"
)

#: The one table of causes and fixes.
VOICES: Mapping[Cause, Voice] = MappingProxyType(
    {
        Cause.SINGLE_CONNECTION: Voice(
            "pinned",
            "one connection carries every call, and a Kubernetes ClusterIP Service balances "
            "connections, not calls",
            f"spread the calls over several connections with {_BALANCED_CHANNEL}, use a "
            "headless Service with round_robin, or set max_connection_age on the server",
        ),
        Cause.CLIENT_IP: Voice(
            "pinned",
            "every fresh connection lands on the same pod although more pods are known: the "
            "Service has sessionAffinity: ClientIP",
            "set the Service's sessionAffinity to None, or use a headless Service with "
            "round_robin; more connections or rotation cannot help while it stays",
        ),
        Cause.ONE_POD_OR_CLIENT_IP: Voice(
            "unverified",
            "every fresh connection reached the same pod and no other pod is known: the "
            "Service has one ready pod, or sessionAffinity: ClientIP hides the others, and "
            "nothing a client sees tells which",
            "if the Deployment has more than one ready replica, set the Service's "
            "sessionAffinity to None; tell the client how many pods to expect "
            "(expected_pods=, doctor --expected-pods) so it can say which",
        ),
        Cause.ROTATION_SKEWED: Voice(
            "skewed",
            "connections are already being replaced (server connection age or GOAWAY), yet "
            "the calls stay uneven",
            f"lower max_connection_age on the server, or spread the calls with {_BALANCED_CHANNEL}",
        ),
        Cause.FEW_CONNECTIONS: Voice(
            "skewed",
            "the calls ride a few long-lived connections, more of them on one pod than "
            "chance explains",
            f"use more connections ({_BALANCED_CHANNEL}) or set max_connection_age on the server",
        ),
        Cause.PER_REQUEST: Voice(
            "l7-balanced",
            "calls are balanced per request in front of the pods (an L7 proxy, a mesh "
            "sidecar, or round_robin)",
            "nothing to do",
            problem=False,
        ),
        Cause.UNIDENTIFIED: Voice(
            "unidentified",
            "calls are answered but no response names its pod: the servers stamp no "
            "identity, so nothing can tell how the calls spread",
            _IDENTITY_FIX,
        ),
        Cause.PODS_LEAVING: Voice(
            "balanced",
            "pods left the Service (a scale-down or a rollout) that the client still counted",
            "nothing to do on the client: lanes on pods that left are drained and replaced; "
            "if expected_pods is set, set it to the Deployment's new replica count",
            problem=False,
        ),
    }
)

#: The balanced channel's ``Stuck.cause`` values, read as the table's causes.
STUCK_CAUSES: Mapping[str, Cause] = MappingProxyType(
    {
        "session-affinity": Cause.CLIENT_IP,
        "one-pod-or-client-ip": Cause.ONE_POD_OR_CLIENT_IP,
        "l7-proxy": Cause.PER_REQUEST,
    }
)


def cause_of_stuck(stuck_cause: str) -> Cause:
    """The table's cause for a balanced channel's stuck reason (``Stuck.cause``)."""
    return STUCK_CAUSES[stuck_cause]


#: The causes a balanced channel is the fix for: once the calls run on one, it is in place.
_FIXED_BY_LANES = frozenset({Cause.SINGLE_CONNECTION, Cause.ROTATION_SKEWED, Cause.FEW_CONNECTIONS})
_ON_LANES = (
    "the calls already run on a balanced channel's lanes (a connection each): calls made before "
    "they moved there stay in the window until newer calls replace them; if the spread stays "
    "uneven, the balanced channel's stuck reason says why, or allow more lanes "
    "(lanes=, max_lanes=)"
)


def advice(cause: Cause, *, on_lanes: bool = False) -> str:
    """The cause and its fix as one sentence for a warning (``"<cause>: <fix>"``).

    Args:
        cause: what makes the calls uneven.
        on_lanes: the target's calls already run on a balanced channel's lanes (a rebalanced
            observed channel moved them there): the advice is no longer to use one.
    """
    if on_lanes and cause in _FIXED_BY_LANES:
        return _ON_LANES
    voice = VOICES[cause]
    return f"{voice.cause}: {voice.fix}"


def say(target: str, cause: Cause, state: str | None = None, evidence: str = "") -> str:
    """The one line every log names ``cause`` with: the target, its state (default the
    cause's own), the evidence seen, the cause and the fix."""
    seen = f": {evidence}" if evidence else ""
    return (
        f"grpc_balance_mw: calls to {target} are {state or VOICES[cause].state}{seen}. "
        f"{VOICES[cause].sentence}"
    )


def one_pod_or_client_ip(connections: int, on_top: int, known_pods: int, alpha: float) -> bool:
    """Whether fresh connections say "one pod, or ClientIP hiding the others": at least two,
    all on one pod, no other pod known, and as unlikely by chance as an alarm needs were there
    two pods (``all_on_one_chance(connections, 2)``)."""
    return (
        known_pods <= 1
        and connections >= 2
        and on_top == connections
        and all_on_one_chance(connections, 2) <= alpha
    )


def alarm_cause(
    *,
    connections: int,
    on_top: int,
    known_pods: int,
    lanes: int,
    rotated: bool,
    per_request: bool,
    alpha: float,
) -> Cause:
    """The likeliest cause of an uneven spread.

    Args:
        connections: recent connection samples (lanes' connections and the probe's dials).
        on_top: how many of them landed on the busiest pod.
        known_pods: how many pods are believed to exist.
        lanes: lanes with recent calls.
        rotated: whether any of those lanes had its connection replaced.
        per_request: whether the calls are balanced per request.
        alpha: how unlikely by chance "all on one pod" must be to name it as the cause.
    """
    if per_request:
        return Cause.PER_REQUEST
    if (
        connections >= 2
        and on_top == connections
        and all_on_one_chance(connections, known_pods) <= alpha
    ):
        return Cause.CLIENT_IP
    if rotated:
        return Cause.ROTATION_SKEWED
    if lanes <= 1:
        return Cause.SINGLE_CONNECTION
    return Cause.FEW_CONNECTIONS
