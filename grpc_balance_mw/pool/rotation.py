"""Rotation policies: when a lane is replaced by a fresh connection. They compose like tenacity's
stop conditions::

    rotation = rotate_after_age(60) | rotate_after_calls(10_000) | rotate_on_alarm()

A policy is asked, per active lane, at each maintenance tick: :meth:`Rotation.why` returns the
reason to rotate it now, or None. Rotating means a replacement lane is dialled and checked first;
the old lane drains afterwards. Policies are pure: time and randomness come in as arguments.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.pool.lane import Lane

__all__ = [
    "ALARM_STATES",
    "Rotation",
    "RotationContext",
    "rotate_after_age",
    "rotate_after_calls",
    "rotate_any",
    "rotate_never",
    "rotate_on_alarm",
    "rotate_when_pod_gone",
]

#: The affinity detector's alarm states (``AffinityState.value``), passed in as plain strings so
#: the pool does not depend on the detector.
ALARM_STATES = frozenset({"pinned", "skewed"})


@dataclass(frozen=True)
class RotationContext:
    """What a policy may look at besides the lane.

    Attributes:
        now: the pool's clock.
        alarm: the affinity detector's state value (``"pinned"``, ``"skewed"``, ...), or None.
        top_pod: the pod with the largest share in the detector's window, if known.
        down_pods: pods known to be NOT_SERVING or gone.
    """

    now: float
    alarm: str | None = None
    top_pod: str | None = None
    down_pods: frozenset[str] = field(default_factory=frozenset)


class Rotation:
    """Base of the policies: ``why`` says if and why a lane should be rotated now."""

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        raise NotImplementedError

    def __call__(self, lane: Lane, context: RotationContext) -> bool:
        return self.why(lane, context) is not None

    def rotate_at(self, activated_at: float, rng: random.Random) -> float | None:
        """When a lane activated at ``activated_at`` is due by age; None: never by age."""
        return None

    def __or__(self, other: Rotation) -> Rotation:
        return rotate_any(self, other)


# Lower-case class names: a policy reads like a sentence, as tenacity's do.
class rotate_any(Rotation):
    """Rotates when any of its policies does; the first one's reason wins."""

    def __init__(self, *policies: Rotation) -> None:
        flat: list[Rotation] = []
        for policy in policies:
            flat.extend(policy.policies if isinstance(policy, rotate_any) else (policy,))
        self.policies: tuple[Rotation, ...] = tuple(flat)

    def __repr__(self) -> str:
        return " | ".join(repr(policy) for policy in self.policies)

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        for policy in self.policies:
            reason = policy.why(lane, context)
            if reason is not None:
                return reason
        return None

    def rotate_at(self, activated_at: float, rng: random.Random) -> float | None:
        times = [policy.rotate_at(activated_at, rng) for policy in self.policies]
        due = [at for at in times if at is not None]
        return min(due) if due else None


class rotate_never(Rotation):
    """Never rotates (lanes are still replaced when they break)."""

    def __repr__(self) -> str:
        return "rotate_never()"

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        return None


class rotate_after_age(Rotation):
    """Rotates a lane ``seconds`` after it started taking calls, +/- ``jitter`` (a fraction) so
    that lanes made together do not all rotate at once (as gRPC jitters max_connection_age)."""

    def __init__(self, seconds: float, jitter: float = 0.2) -> None:
        if seconds <= 0 or not 0 <= jitter < 1:
            raise ConfigurationError("rotate_after_age needs seconds > 0 and 0 <= jitter < 1")
        self.seconds = seconds
        self.jitter = jitter

    def __repr__(self) -> str:
        return f"rotate_after_age({self.seconds:g}, jitter={self.jitter:g})"

    def rotate_at(self, activated_at: float, rng: random.Random) -> float | None:
        return activated_at + self.seconds * (1 + rng.uniform(-self.jitter, self.jitter))

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        return "age" if lane.has_expired(context.now) else None


class rotate_after_calls(Rotation):
    """Rotates a lane after it took ``calls`` calls (Istio's maxRequestsPerConnection)."""

    def __init__(self, calls: int) -> None:
        if calls < 1:
            raise ConfigurationError(f"rotate_after_calls needs calls >= 1, got {calls}")
        self.calls = calls

    def __repr__(self) -> str:
        return f"rotate_after_calls({self.calls})"

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        return "calls" if lane.calls >= self.calls else None


class rotate_on_alarm(Rotation):
    """Rotates the lanes on the over-loaded pod while the affinity detector raises an alarm.

    Args:
        states: the detector states that count as an alarm.
        min_age_s: a lane younger than this is left alone, so one alarm (which the detector
            holds for a while, by hysteresis) does not rotate the same slot over and over.
    """

    def __init__(self, states: Iterable[str] = ALARM_STATES, *, min_age_s: float = 5.0) -> None:
        self.states = frozenset(states)
        self.min_age_s = min_age_s

    def __repr__(self) -> str:
        return f"rotate_on_alarm({sorted(self.states)}, min_age_s={self.min_age_s:g})"

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        if context.alarm not in self.states or lane.age(context.now) < self.min_age_s:
            return None
        if context.top_pod is not None and lane.pod != context.top_pod:
            return None
        return f"alarm {context.alarm}"


class rotate_when_pod_gone(Rotation):
    """Rotates a lane whose pod went NOT_SERVING or away, or whose calls failed UNAVAILABLE."""

    def __repr__(self) -> str:
        return "rotate_when_pod_gone()"

    def why(self, lane: Lane, context: RotationContext) -> str | None:
        if lane.pod is not None and lane.pod in context.down_pods:
            return "pod down"
        return "unavailable" if lane.unavailable else None
