"""Per-lane evidence: one lane's pods in order, its pod switches and its connection epochs.

Calls on one HTTP/2 connection are not independent samples of where a balancer sends calls:
300 calls on one connection are one observation of kube-proxy's pick. So what a lane (one
channel) shows is read in order:

- its first call names the pod its connection landed on: one connection sample;
- a pod change between calls, when changes are frequent (at least ``_ENTER_SWITCHES`` of the
  last ``_RECENT`` calls), means something between balances per request: the client's
  ``round_robin`` over several addresses, or an L7 proxy of any kind;
- a rare change on an otherwise steady lane is a reconnect (server ``max_connection_age``,
  GOAWAY): a new connection epoch, and another connection sample.

A lane is a connection, and an observer watches one channel, so an observer has one lane. An
interceptor, though, can be installed on several channels (one ``AffinityInterceptor`` passed to
several ``grpc.intercept_channel`` calls): :class:`ChannelLanes` then keeps a lane per channel,
since the calls of several pinned channels, interleaved on one lane, would switch pods at nearly
every call and read as per-request balancing.

Pure: no clock of its own, no locks (the detector holds its lock while it feeds a lane).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import warnings
from collections.abc import Hashable
from typing import Any

__all__ = ["ChannelLanes", "LaneEvidence", "LaneStep"]

#: A lane balances per request once this many of its last ``_RECENT`` calls switched pods...
_RECENT_MASK = 0xFF
_ENTER_SWITCHES = 3
#: ...and stops once none of its last 32 did.
_LEAVE_MASK = 0xFFFFFFFF
#: Distinct pods remembered per lane (enough to end any warm-up; bounded against churn).
_LANE_PODS = 64
#: Channels one observer keeps a lane for; beyond it the channel seen longest ago is forgotten.
_MAX_CHANNELS = 1024

_names = itertools.count()


class LaneStep(enum.Enum):
    """What one identified call on a lane means."""

    #: The lane's first identified call: where its connection landed.
    FIRST = "first"
    #: On the same pod as the call before.
    SAME = "same"
    #: Another pod after a steady run: the connection was replaced (a new epoch).
    ROTATED = "rotated"
    #: Another pod, as calls on this lane keep doing: balanced per request.
    SWITCHED = "switched"


class LaneEvidence:
    """The evidence of one lane (one channel, one connection at a time).

    Args:
        name: how telemetry and snapshots call it.
    """

    __slots__ = (
        "_recent",
        "calls",
        "epochs",
        "first_at",
        "last_at",
        "name",
        "per_request",
        "pod",
        "pods",
        "rotated_at",
        "run",
        "switches",
        "warm",
    )

    def __init__(self, name: str | None = None) -> None:
        self.name = name if name is not None else f"lane-{next(_names)}"
        self.calls = 0
        self.pod: str | None = None
        #: Identified calls in a row on ``pod`` (since the last switch).
        self.run = 0
        self.switches = 0
        #: Connection epochs: 1 from the first call, one more per rotation.
        self.epochs = 0
        self.pods: set[str] = set()
        self.first_at: float | None = None
        self.last_at = 0.0
        self.per_request = False
        #: When the lane's connection was last replaced (None: never).
        self.rotated_at: float | None = None
        #: Set once the warm-up ended; the lane's calls are judged from then on.
        self.warm = False
        self._recent = 0  # one bit per identified call, 1 where it switched pods

    def __repr__(self) -> str:
        how = "per-request" if self.per_request else f"{self.epochs} connection(s)"
        return (
            f"<LaneEvidence {self.name}: {self.calls} calls on {len(self.pods)} pods, {how}, "
            f"{self.switches} switches>"
        )

    def see(self, pod: str, at: float) -> LaneStep:
        """One identified call, in the order the lane's calls finished."""
        self.calls += 1
        self.last_at = at
        previous = self.pod
        if pod == previous:  # the usual case first: a connection keeps its pod
            self.run += 1
            recent = self._recent
            if recent:
                recent = self._recent = (recent << 1) & _LEAVE_MASK
                if not recent:
                    self.per_request = False
            return _SAME
        if previous is None:
            self.first_at = at
            self.pod, self.run, self.epochs = pod, 1, 1
            self._remember(pod)
            return LaneStep.FIRST
        self.switches += 1
        self.pod, self.run = pod, 1
        self._remember(pod)
        recent = self._recent = ((self._recent << 1) | 1) & _LEAVE_MASK
        if not self.per_request and (recent & _RECENT_MASK).bit_count() >= _ENTER_SWITCHES:
            self.per_request = True
        if self.per_request:
            return LaneStep.SWITCHED
        self.epochs += 1
        self.rotated_at = at
        return LaneStep.ROTATED

    @property
    def switching(self) -> bool:
        """Whether any of the last 32 identified calls switched pods (``per_request`` may
        still be False: too few did)."""
        return self._recent != 0

    def steady(self, calls: int, at: float) -> None:
        """``calls`` identified calls on the lane's pod, the last ending ``at``: what ``see``
        does for each while the lane is not ``switching``."""
        self.calls += calls
        self.run += calls
        self.last_at = at

    def _remember(self, pod: str) -> None:
        if len(self.pods) < _LANE_PODS:
            self.pods.add(pod)

    @property
    def rotated(self) -> bool:
        """Whether this lane's connection was replaced at least once (rotation is on)."""
        return self.epochs > 1

    def warming(self, at: float, warmup_s: float, pods_to_see: int | None) -> bool:
        """Whether a call ending ``at`` still falls in the lane's warm-up; ends it for good.

        Args:
            at: when the call ended.
            warmup_s: the time bound of any warm-up, from the lane's first call.
            pods_to_see: the warm-up ends once the lane has seen this many pods (a
                multi-address target: ``round_robin`` reaches them one subchannel at a time);
                0 for no warm-up (a single-address target), None for the time bound alone.
        """
        if self.warm:
            return False
        if self.first_at is None:
            self.first_at = at
        if (
            pods_to_see == 0
            or (pods_to_see is not None and len(self.pods) >= pods_to_see)
            or at - self.first_at >= warmup_s
        ):
            self.warm = True
            return False
        return True


_SAME = LaneStep.SAME


class ChannelLanes:
    """The lanes of one observer, one per channel it is installed on.

    The first channel gets ``first`` (the observer's own lane, with its name); each other
    channel a lane named ``<first>.<n>``. A channel is named by any hashable key that stays
    the same for its life (the adapters use the channel object's ``id``, and forget it when
    the channel is collected, where they can tell).

    Callers on any thread may ask at once, without a lock (so nothing is left held in a forked
    child): each step is one atomic dict or counter operation, and two threads that race for
    one new channel agree on the lane ``setdefault`` kept.

    Args:
        first: the lane of the first channel seen.
        limit: the most channels remembered (the one seen first is forgotten first).
    """

    __slots__ = ("_by_key", "_made", "first", "limit")

    def __init__(self, first: LaneEvidence, limit: int = _MAX_CHANNELS) -> None:
        self.first = first
        self.limit = limit
        self._by_key: dict[Hashable, LaneEvidence] = {}
        self._made = itertools.count()

    def __len__(self) -> int:
        return len(self._by_key)

    def __repr__(self) -> str:
        return f"<ChannelLanes of {self.first.name}: {len(self._by_key)} channel(s)>"

    def get(self, key: Hashable) -> LaneEvidence | None:
        """The lane of the channel named ``key``, None for a channel not seen yet."""
        return self._by_key.get(key)

    def lane(self, key: Hashable) -> LaneEvidence:
        """The lane of the channel named ``key``; a new one for a channel not seen yet."""
        by_key = self._by_key
        lane = by_key.get(key)
        if lane is not None:
            return lane
        made = next(self._made)
        lane = self.first if made == 0 else LaneEvidence(f"{self.first.name}.{made}")
        if len(by_key) >= self.limit:
            # Another thread may change the dict between iter and next, or pop the same key.
            with contextlib.suppress(RuntimeError, StopIteration, KeyError):
                del by_key[next(iter(by_key))]
        return by_key.setdefault(key, lane)

    def forget(self, key: Hashable) -> None:
        """The channel named ``key`` is gone (its key may name another channel next)."""
        self._by_key.pop(key, None)


def __getattr__(name: str) -> Any:
    """``Lane``, this class's old name (the pool has a ``Lane`` of its own): kept for one
    release, with a ``DeprecationWarning``."""
    if name == "Lane":
        warnings.warn(
            "grpc_balance_mw.affinity.lanes.Lane is deprecated: use LaneEvidence",
            DeprecationWarning,
            stacklevel=2,
        )
        return LaneEvidence
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
