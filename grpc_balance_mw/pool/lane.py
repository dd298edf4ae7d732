"""A lane: one connection of a balanced channel, the pod it reached, and where it is in its life."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpc_balance_mw.pool.weights import LaneLoad


class LaneState(enum.Enum):
    """Where a lane is in its life; it only ever moves down this list."""

    #: Planned: the adapter has yet to open its connection.
    DIALING = "dialing"
    #: Its connection exists; the health check that names its pod has not answered yet.
    CHECKING = "checking"
    #: Takes calls.
    ACTIVE = "active"
    #: Takes no new calls; its calls and streams finish, then it closes.
    DRAINING = "draining"
    #: Its connection is (being) closed.
    CLOSED = "closed"


class LanePurpose(enum.Enum):
    """Why a lane was dialled; it decides what the pool does with the pod the lane reached."""

    #: One more lane to reach the wanted number of lanes.
    FILL = "fill"
    #: The replacement of a lane that is rotated out (``Lane.replaces``).
    REPLACE = "replace"
    #: A cheap look for pods no lane covers (e.g. after a scale-up); kept only if it found one.
    SCOUT = "scout"


class Lane:
    """One connection of the pool. The pool changes it under its lock; adapters only read it.

    Attributes:
        id: unique within its pool, increasing.
        name: ``lane-<id>``, the value of ``grpc_balance_mw.lane`` on spans.
        purpose: why it was dialled.
        replaces: the id of the lane it is to replace (purpose REPLACE), else None.
        attempt: how many dials for the same purpose came before this one (redials).
        pod: the pod its health check reached; None until checked, or if the pod does not say.
        state: where it is in its life.
        created_at: when it was planned (the pool's clock).
        activated_at: when it started taking calls.
        rotate_at: when it should be rotated out by age; None: not by age.
        draining_since: when it stopped taking calls.
        calls: calls it has taken.
        in_flight: calls (and open streams) on it now.
        unavailable: its calls that failed with UNAVAILABLE (its pod killed or gone).
        unanswered: its health checks in a row that got no answer (its pod hangs).
        claimed: the pod its first check named, when never seen before: believed once a
            second check names it too.
        renamed: its two checks named two pods while no other lane's pod was known (an L7
            proxy, or one pod renaming itself): kept unnamed for now.
        moved: a health check named another pod than the one it had (a reconnect, or an
            L7 proxy balancing the checks too).
        suspect: active, but a call on it passed its deadline while other lanes answered: it
            takes no new calls until a health check says its pod answers.
        heard: the pool's count of answered calls when this lane last answered one (or
            started taking calls): other lanes answered since if the count went past it.
        answered: its calls answered (any status its pod is not blamed for) since the last
            outlier sweep; ``failed``: those its pod is blamed for (see
            :mod:`grpc_balance_mw.pool.outliers`).
        streak: its failed calls in a row, counted from ``streak_heard`` (its ``heard`` when
            the streak began: an answer changes ``heard`` and so ends the streak).
        reason: why it drains or closed, for logs and ``__repr__``.
        load: its pod's load reports and weight, for a picker that weighs lanes (None: none).
        joined_at: when its pod joined the target, if it joined after the pool started (a
            scale-up, not a rotation onto a known pod): slow start ramps its share.
        move_from: for a replacement that moves a lane off a pod above the mean
            (``PoolConfig.subset``), the connections that pod held: it is kept only on a pod
            holding fewer. None for every other lane.
        connection: what the adapter keeps for it (its channel); the pool never touches it.
    """

    __slots__ = (
        "activated_at",
        "answered",
        "attempt",
        "calls",
        "claimed",
        "connection",
        "created_at",
        "draining_since",
        "failed",
        "heard",
        "id",
        "in_flight",
        "joined_at",
        "last_picked",
        "load",
        "move_from",
        "moved",
        "name",
        "pod",
        "purpose",
        "reason",
        "renamed",
        "replaces",
        "rotate_at",
        "state",
        "streak",
        "streak_heard",
        "suspect",
        "unanswered",
        "unavailable",
    )

    def __init__(
        self,
        lane_id: int,
        created_at: float,
        *,
        purpose: LanePurpose = LanePurpose.FILL,
        replaces: int | None = None,
        attempt: int = 0,
    ) -> None:
        self.id = lane_id
        self.name = f"lane-{lane_id}"
        self.purpose = purpose
        self.replaces = replaces
        self.attempt = attempt
        self.pod: str | None = None
        self.state = LaneState.DIALING
        self.created_at = created_at
        self.activated_at: float | None = None
        self.rotate_at: float | None = None
        self.draining_since: float | None = None
        self.calls = 0
        self.in_flight = 0
        self.unavailable = 0
        self.unanswered = 0
        self.suspect = False
        self.heard = 0
        self.answered = 0
        self.failed = 0
        self.streak = 0
        self.streak_heard = -1
        self.claimed: str | None = None
        self.renamed = False
        self.moved = False
        self.move_from: float | None = None
        self.last_picked = 0
        self.load: LaneLoad | None = None
        self.joined_at: float | None = None
        self.reason = ""
        self.connection: Any = None

    def __repr__(self) -> str:
        pod = f" {self.pod}" if self.pod else ""
        why = f" ({self.reason})" if self.reason else ""
        state = f"{self.state.value}, suspect" if self.suspect else self.state.value
        return (
            f"<Lane {self.name} {state}{pod}: {self.calls} calls, {self.in_flight} in flight{why}>"
        )

    def is_available(self) -> bool:
        """Takes new calls."""
        return self.state is LaneState.ACTIVE and not self.suspect

    def is_pending(self) -> bool:
        """Dialled or being checked: not yet decided."""
        return self.state in (LaneState.DIALING, LaneState.CHECKING)

    def is_draining(self) -> bool:
        return self.state is LaneState.DRAINING

    def is_closed(self) -> bool:
        return self.state is LaneState.CLOSED

    def is_idle(self) -> bool:
        """No call or stream on it."""
        return self.in_flight == 0

    def has_expired(self, now: float) -> bool:
        """Its age rotation time has come."""
        return self.rotate_at is not None and now >= self.rotate_at

    def age(self, now: float) -> float:
        """Seconds since it started taking calls (0 before)."""
        return 0.0 if self.activated_at is None else now - self.activated_at

    def drain_expired(self, now: float, grace_s: float) -> bool:
        """It has drained for longer than the grace period."""
        return self.draining_since is not None and now - self.draining_since >= grace_s
