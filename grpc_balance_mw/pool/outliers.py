"""Outlier ejection (gRFC A50, plus Envoy's ``consecutive_5xx``): pods that answer errors while
their health checks say SERVING stop getting calls for a while. Pure: no gRPC, time passed in.

An *endpoint* is a pod (the lanes of a balanced channel map to pods); a lane whose pod is not
known counts as an endpoint of its own. The pool counts each lane's answered and failed calls
(a counter increment per call) and, once per ``interval_s``, hands the counts of the interval,
summed per endpoint, to :meth:`OutlierEjector.sweep`, which runs A50's two algorithms:

- **failure percentage**: an endpoint with at least ``failure_percentage_request_volume`` calls
  in the interval, ``failure_percentage_threshold`` % or more of them failed, is ejected;
- **success rate**: among endpoints with ``success_rate_request_volume`` calls or more (at least
  ``success_rate_minimum_hosts`` of them), one whose success rate is below
  ``mean - success_rate_stdev_factor * stdev`` is ejected;

and then returns the endpoints whose ejection time has passed. Between sweeps, an endpoint whose
lane fails ``consecutive_failures`` calls in a row is ejected at once (Envoy's
``consecutive_5xx``, which A50 leaves out): a pod that answers every call with an error costs a
few calls, not an interval's worth.

An endpoint is ejected for ``base_ejection_s`` times the number of times it was ejected (that
multiplier drops by one on every sweep that finds it not ejected), at most
``max(base_ejection_s, max_ejection_s)``. As in A50, before each ejection the share of
endpoints already ejected is compared with ``max_ejection_percent``: the ejection is skipped
only if the share is *greater*, so the first one is always allowed (with 3 pods and the default
10 %, one pod; with 20 pods, three). The pool's picker never leaves a call without a lane: if
every lane's pod is ejected, calls go to all of them.

Where this differs from A50, and why:

- Only failures a pod is to blame for count (:data:`POD_FAILURES`): UNAVAILABLE sent by the pod
  itself (one whose connection is gone is handled by the pool, which drains the lane), INTERNAL,
  UNKNOWN, DATA_LOSS, and DEADLINE_EXCEEDED when other lanes answered in the meantime (the pool
  decides that one). CANCELLED (the client's own doing) and application codes (NOT_FOUND,
  INVALID_ARGUMENT, FAILED_PRECONDITION...) count as answers: the pod works. A50 counts every
  non-OK status; for a library under applications whose methods return NOT_FOUND by design, that
  would eject healthy pods.
- No ejection when no other endpoint is doing well: when every pod fails alike the fault is
  shared (a database they all use, a bad rollout of the client's own requests) and ejecting one
  moves no call to a working pod. The failure-percentage sweep needs an endpoint below the
  threshold (in the success-rate sweep, pods failing alike are no outliers); a
  consecutive-failure ejection needs two endpoints or more, and another lane to have answered
  since the failing one last did.
- ``enforcement_percentage`` is always 100 (no random enforcement).
- Smaller thresholds of hosts for failure percentage (2 instead of 5): a Kubernetes Service often
  has 3 pods, and the shared-fault rule above does the job ``minimum_hosts`` does in A50.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from grpc_balance_mw.errors import ConfigurationError

__all__ = [
    "OUTLIERS",
    "POD_FAILURES",
    "OutlierDetection",
    "OutlierEjector",
    "OutlierEvent",
]

#: The source of the pod events outlier ejection adds to spans.
OUTLIERS = "outlier_detection"
#: Status codes (by name, to keep this module free of grpc) that count against the pod that sent
#: them. DEADLINE_EXCEEDED counts too, but only when other lanes answered meanwhile.
POD_FAILURES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "DATA_LOSS"})


@dataclass(frozen=True)
class OutlierDetection:
    """When a pod that answers errors is ejected (takes no calls) and for how long. On by default:
    the thresholds only catch a pod that fails far more than the others (5 calls in a row, or
    85 % of an interval's calls, while other pods answer), which a healthy fleet never does.
    Pass ``PoolConfig(outlier_detection=None)`` to turn it off.

    Attributes:
        interval_s: how often the counts are judged and ejected pods returned (A50: 10 s).
        base_ejection_s: the first ejection's length; the n-th lasts n times this (A50: 30 s).
        max_ejection_s: ejections last at most ``max(base_ejection_s, max_ejection_s)``.
        max_ejection_percent: no ejection while more than this share of pods is ejected; the
            first ejection is always allowed, even with 0, as A50's rule reads (A50: 10).
        consecutive_failures: failed calls in a row on one lane that eject its pod at once,
            while other lanes answer (Envoy: 5). None: off.
        failure_percentage_threshold: an endpoint whose calls in an interval failed this
            often or more (percent) is ejected (A50: 85). None: off.
        failure_percentage_minimum_hosts: endpoints needed for the failure-percentage sweep
            (A50: 5; 2 here, see the module's notes).
        failure_percentage_request_volume: calls an endpoint needs in an interval to be
            judged by failure percentage (A50: 50).
        success_rate_stdev_factor: an endpoint whose success rate is below the mean minus this
            many standard deviations is ejected (A50: 1.9). None: off.
        success_rate_minimum_hosts: endpoints with enough calls needed for the success-rate
            sweep (A50: 5).
        success_rate_request_volume: calls an endpoint needs in an interval to be judged by
            success rate (A50: 100).
    """

    interval_s: float = 10.0
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: int = 10
    consecutive_failures: int | None = 5
    failure_percentage_threshold: int | None = 85
    failure_percentage_minimum_hosts: int = 2
    failure_percentage_request_volume: int = 50
    success_rate_stdev_factor: float | None = 1.9
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.base_ejection_s <= 0 or self.max_ejection_s < 0:
            raise ConfigurationError(
                "OutlierDetection needs interval_s > 0, base_ejection_s > 0, max_ejection_s >= 0"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ConfigurationError(
                f"max_ejection_percent must be 0..100, got {self.max_ejection_percent}"
            )
        threshold = self.failure_percentage_threshold
        if threshold is not None and not 0 <= threshold <= 100:
            raise ConfigurationError(
                f"failure_percentage_threshold must be 0..100 or None, got {threshold}"
            )
        if self.consecutive_failures is not None and self.consecutive_failures < 1:
            raise ConfigurationError(
                f"consecutive_failures must be >= 1 or None, got {self.consecutive_failures}"
            )
        factor = self.success_rate_stdev_factor
        if factor is not None and factor < 0:
            raise ConfigurationError(f"success_rate_stdev_factor must be >= 0, got {factor}")
        if (
            self.failure_percentage_minimum_hosts < 1
            or self.success_rate_minimum_hosts < 1
            or self.failure_percentage_request_volume < 1
            or self.success_rate_request_volume < 1
        ):
            raise ConfigurationError("OutlierDetection's minimum hosts and volumes must be >= 1")

    def ejection_s(self, times: int) -> float:
        """How long the ``times``-th ejection in a row lasts."""
        return min(self.base_ejection_s * times, max(self.base_ejection_s, self.max_ejection_s))


@dataclass(frozen=True)
class OutlierEvent:
    """An endpoint ejected or returned, for the adapter's log (and tests).

    Attributes:
        endpoint: the pod (or ``lane-<id>`` for a lane whose pod is not known).
        ejected: True for an ejection, False for a return.
        reason: why (``"5 failures in a row"``, ``"failure percentage 100 %"``...).
        duration_s: how long the ejection lasts (0 for a return).
        at: when (the pool's clock).
    """

    endpoint: str
    ejected: bool
    reason: str
    duration_s: float
    at: float

    @property
    def kind(self) -> str:
        """``pod_ejected`` or ``pod_returned``: the span event's name (after its prefix)."""
        return "pod_ejected" if self.ejected else "pod_returned"

    @property
    def level(self) -> int:
        """WARNING for an ejection, INFO for a return."""
        return logging.WARNING if self.ejected else logging.INFO

    @property
    def message(self) -> str:
        if self.ejected:
            return (
                f"pod {self.endpoint} ejected for {self.duration_s:g} s ({self.reason}): its "
                "calls fail while other pods answer; its lanes take no calls meanwhile"
            )
        return f"pod {self.endpoint} returns from ejection ({self.reason})"


@dataclass
class _Endpoint:
    ejected_at: float | None = None
    until: float = 0.0
    multiplier: int = 0


@dataclass
class OutlierEjector:
    """A50's state: each endpoint's ejection and multiplier. Driven by the pool under its lock.

    Attributes:
        config: the thresholds.
        ejected: the endpoints ejected now; the pool's picker reads it on every call, so it is
            one set, changed in place.
        ejections: ejections so far (a metric).
        ejected_pods: ejections so far per endpoint (read-only for callers: which pods).
        events: ejections and returns not yet handed to the adapter (:meth:`take_events`).
    """

    config: OutlierDetection
    ejected: set[str] = field(default_factory=set)
    ejections: int = 0
    ejected_pods: dict[str, int] = field(default_factory=dict)
    events: list[OutlierEvent] = field(default_factory=list)
    _endpoints: dict[str, _Endpoint] = field(default_factory=dict)
    _next_sweep: float | None = None

    def due(self, now: float) -> bool:
        """Whether a sweep is due (the first call starts the interval)."""
        if self._next_sweep is None:
            self._next_sweep = now + self.config.interval_s
            return False
        return now >= self._next_sweep

    def take_events(self) -> list[OutlierEvent]:
        events, self.events = self.events, []
        return events

    def failed_in_row(
        self, endpoint: str, streak: int, others_answered: bool, hosts: int, now: float
    ) -> bool:
        """A lane of ``endpoint`` failed ``streak`` calls in a row; ``others_answered``: another
        lane answered since it last did; ``hosts``: endpoints the pool has now. Ejects it if
        that reaches ``consecutive_failures``; returns whether it did."""
        wanted = self.config.consecutive_failures
        if (
            wanted is None
            or streak < wanted
            or not others_answered
            or hosts < 2  # a lone pod: there is nowhere better to send its calls
            or endpoint in self.ejected
        ):
            return False
        if not self._room(hosts):
            return False
        self._eject(endpoint, now, f"{streak} failures in a row")
        return True

    def sweep(self, now: float, counts: Mapping[str, tuple[int, int]]) -> None:
        """One interval's end: ``counts`` maps every endpoint the pool has now to its
        (answered, failed) calls in the interval. Ejects outliers, then returns endpoints whose
        time is up, and lowers the multiplier of those not ejected (A50's order)."""
        self._next_sweep = now + self.config.interval_s
        hosts = set(counts) | self.ejected
        self._success_rate(now, counts, len(hosts))
        self._failure_percentage(now, counts, len(hosts))
        for name, endpoint in list(self._endpoints.items()):
            if endpoint.ejected_at is None:
                if endpoint.multiplier > 0:
                    endpoint.multiplier -= 1
                elif name not in counts:
                    del self._endpoints[name]  # gone, and nothing left to remember
            elif now >= endpoint.until:
                endpoint.ejected_at = None
                self.ejected.discard(name)
                self.events.append(OutlierEvent(name, False, "its ejection time is up", 0.0, now))

    def _success_rate(self, now: float, counts: Mapping[str, tuple[int, int]], hosts: int) -> None:
        config = self.config
        factor = config.success_rate_stdev_factor
        if factor is None:
            return
        rates = {
            name: answered / (answered + failed)
            for name, (answered, failed) in counts.items()
            if answered + failed >= config.success_rate_request_volume
        }
        if len(rates) < config.success_rate_minimum_hosts:
            return
        mean = sum(rates.values()) / len(rates)
        stdev = math.sqrt(sum((rate - mean) ** 2 for rate in rates.values()) / len(rates))
        floor = mean - stdev * factor  # all failing alike: stdev 0, none below the mean
        for name, rate in sorted(rates.items()):
            if not self._room(hosts):
                return
            if rate < floor and name not in self.ejected:
                self._eject(name, now, f"success rate {100 * rate:.0f} % below {100 * floor:.0f} %")

    def _failure_percentage(
        self, now: float, counts: Mapping[str, tuple[int, int]], hosts: int
    ) -> None:
        config = self.config
        threshold = config.failure_percentage_threshold
        if threshold is None or hosts < config.failure_percentage_minimum_hosts:
            return
        percents = {
            name: 100.0 * failed / (answered + failed)
            for name, (answered, failed) in counts.items()
            if answered + failed >= config.failure_percentage_request_volume
        }
        healthy = any(
            100.0 * failed / (answered + failed) < threshold
            for answered, failed in counts.values()
            if answered
        )
        if not healthy:
            return  # every pod fails alike: a shared fault, ejecting one helps no call
        for name, percent in sorted(percents.items()):
            if not self._room(hosts):
                return
            if percent >= threshold and name not in self.ejected:
                self._eject(name, now, f"failure percentage {percent:.0f} %")

    def _room(self, hosts: int) -> bool:
        """A50: no ejection while the share already ejected is greater than the maximum."""
        return 100 * len(self.ejected) <= self.config.max_ejection_percent * max(hosts, 1)

    def _eject(self, name: str, now: float, reason: str) -> None:
        endpoint = self._endpoints.setdefault(name, _Endpoint())
        endpoint.multiplier += 1
        endpoint.ejected_at = now
        duration = self.config.ejection_s(endpoint.multiplier)
        endpoint.until = now + duration
        self.ejected.add(name)
        self.ejections += 1
        self.ejected_pods[name] = self.ejected_pods.get(name, 0) + 1
        self.events.append(OutlierEvent(name, True, reason, duration, now))
