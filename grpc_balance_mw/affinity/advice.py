"""Why a target is skewed or pinned, and the fix that applies to that cause.

Advice names only what exists: a Service setting, a server option, or this package's balanced
channel. It is chosen from what was observed, so a user behind ``sessionAffinity: ClientIP`` is
not told to add connections that would all land on the same pod anyway, and a user whose calls
already moved onto a balanced channel's lanes (``observe(..., rebalance=)``) is not told to use
one: the alarm then comes from calls made before the move, still in the window, or from lanes
that could not reach distinct pods.
"""

from __future__ import annotations

import enum

from grpc_balance_mw.affinity.evidence import all_on_one_chance

__all__ = ["Cause", "advice", "alarm_cause"]

_BALANCED_CHANNEL = "a balanced channel (grpc_balance_mw.balanced_channel)"


class Cause(enum.Enum):
    """What makes a target's calls uneven."""

    #: One connection carries the calls: a ClusterIP Service balanced it once, when it opened.
    SINGLE_CONNECTION = "single_connection"
    #: Every fresh connection lands on the same pod while more are known: the Service's
    #: ``sessionAffinity: ClientIP``, or only one of its pods is ready.
    SAME_POD_EVERY_CONNECTION = "same_pod_every_connection"
    #: Connections are replaced (server connection age, GOAWAY), yet calls stay uneven.
    ROTATION_SKEWED = "rotation_skewed"
    #: A few long-lived connections, more of them on one pod than chance explains.
    FEW_CONNECTIONS = "few_connections"
    #: Something between balances every call (an L7 proxy, the client's ``round_robin``).
    PER_REQUEST = "per_request"


_ADVICE = {
    Cause.SINGLE_CONNECTION: (
        "one connection carries every call, and a Kubernetes ClusterIP Service balances "
        "connections, not calls: spread the calls over several connections with "
        f"{_BALANCED_CHANNEL}, use a headless Service with round_robin, or set "
        "max_connection_age on the server"
    ),
    Cause.SAME_POD_EVERY_CONNECTION: (
        "every fresh connection lands on the same pod although more pods are known: the "
        "Service most likely has sessionAffinity: ClientIP (remove it from the Service), or "
        "only one of its pods is ready; more connections or rotation cannot help while it stays"
    ),
    Cause.ROTATION_SKEWED: (
        "connections are already being replaced (server connection age or GOAWAY), yet the "
        "calls stay uneven: lower max_connection_age on the server, or spread the calls with "
        f"{_BALANCED_CHANNEL}"
    ),
    Cause.FEW_CONNECTIONS: (
        "the calls ride a few long-lived connections, more of them on one pod than chance "
        f"explains: use more connections ({_BALANCED_CHANNEL}) or set max_connection_age on "
        "the server"
    ),
    Cause.PER_REQUEST: "calls are balanced per request in front of the pods: nothing to do",
}


#: The causes a balanced channel is the fix for: once the calls run on one, it is in place.
_FIXED_BY_LANES = frozenset({Cause.SINGLE_CONNECTION, Cause.ROTATION_SKEWED, Cause.FEW_CONNECTIONS})
_ON_LANES = (
    "the calls already run on a balanced channel's lanes (a connection each): calls made before "
    "they moved there stay in the window until newer calls replace them; if the spread stays "
    "uneven, the balanced channel's stuck reason says why, or allow more lanes "
    "(lanes=, max_lanes=)"
)


def advice(cause: Cause, *, on_lanes: bool = False) -> str:
    """The fix that applies to ``cause``, as one sentence for a warning.

    Args:
        cause: what makes the calls uneven.
        on_lanes: the target's calls already run on a balanced channel's lanes (a rebalanced
            observed channel moved them there): the advice is no longer to use one.
    """
    if on_lanes and cause in _FIXED_BY_LANES:
        return _ON_LANES
    return _ADVICE[cause]


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
        return Cause.SAME_POD_EVERY_CONNECTION
    if rotated:
        return Cause.ROTATION_SKEWED
    if lanes <= 1:
        return Cause.SINGLE_CONNECTION
    return Cause.FEW_CONNECTIONS
