"""Lane weights from the pods' own load reports, as gRPC's ``weighted_round_robin`` (gRFC A58).

A pod's ORCA report (:mod:`grpc_balance_mw.orca`) says how busy it is with the calls of every
client, where a lane's calls in flight show only this client's share. A58 turns the reports
into a weight per endpoint: ``qps / (utilization + eps / qps * error_utilization_penalty)``,
i.e. the calls a pod answers per unit of its capacity, so a pod that does the same work with
less of its capacity (a faster node, less load from other clients) weighs more. Pure
bookkeeping: the pool feeds it under its lock, the picker reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.orca import LoadReport

__all__ = ["READ_EVERY_S", "LaneLoad", "SlowStart", "WeightConfig", "report_weight"]

#: A lane's pod reports on every call, but its weight changes once per update (A58: 1 s), so
#: one report in this long is read (decoding one costs about as much as the rest of the
#: client's work on a call, and a sync unary call must switch to ``with_call`` to see it).
READ_EVERY_S = 0.1


@dataclass(frozen=True)
class SlowStart:
    """Envoy's ``slow_start_config``: a pod that has just joined the target (not a lane rotated
    onto a pod already known) gets a share that ramps up over ``window_s`` seconds, so a cold
    pod (empty caches, a JIT still warming) is not handed a full share at once.

    Its weight is scaled by ``max(min_weight_percent / 100, (t / window_s) ** (1 / aggression))``
    where ``t`` is the time since the pod joined.
    """

    window_s: float = 30.0
    aggression: float = 1.0
    min_weight_percent: float = 10.0

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.aggression <= 0 or not 0 < self.min_weight_percent <= 100:
            raise ConfigurationError(
                "SlowStart needs window_s > 0, aggression > 0 and 0 < min_weight_percent <= 100"
            )

    def factor(self, since_join_s: float) -> float:
        """The scale of a weight ``since_join_s`` seconds after its pod joined (1.0: full)."""
        if since_join_s >= self.window_s:
            return 1.0
        ramp: float = (max(since_join_s, 0.0) / self.window_s) ** (1.0 / self.aggression)
        return max(self.min_weight_percent / 100.0, ramp)


@dataclass(frozen=True)
class WeightConfig:
    """A58's knobs, with its defaults.

    Attributes:
        blackout_s: a lane's weight counts only once it has had reports for this long (a pod
            that just started reports a low utilization before its load arrives).
        expiration_s: a lane whose last report is older than this has no weight (its pod
            stopped reporting); its blackout starts again with its next report.
        error_penalty: how much a pod's errors per second count as utilization (a pod that
            fails calls fast must not look idle).
        update_s: how often the picker recomputes the weights.
        slow_start: ramp the share of a pod that just joined (None: off).
        peak_ewma_s: when no pod reports its load, weigh lanes by the latency of their
            unary-response calls: a Peak-EWMA (Linkerd's, Finagle's) that jumps to a higher
            latency at once and decays with this time constant (10 s is Linkerd's). None
            (the default): off, and no call is timed.
        latency_spread: latencies start to weigh when the slowest lane's average is at
            least this many times the fastest's (jitter must not reorder even pods), and
            stop when it falls below the square root of that.
    """

    blackout_s: float = 10.0
    expiration_s: float = 180.0
    error_penalty: float = 1.0
    update_s: float = 1.0
    slow_start: SlowStart | None = None
    peak_ewma_s: float | None = None
    latency_spread: float = 2.0

    def __post_init__(self) -> None:
        if min(self.blackout_s, self.expiration_s, self.error_penalty, self.update_s) < 0:
            raise ConfigurationError("WeightConfig's periods and penalty must be >= 0")
        if (self.peak_ewma_s is not None and self.peak_ewma_s <= 0) or self.latency_spread < 1:
            raise ConfigurationError("WeightConfig needs peak_ewma_s > 0 and latency_spread >= 1")


def report_weight(report: LoadReport, error_penalty: float) -> float:
    """A58's weight of one report; 0 for a report that carries no weight (no qps or no
    utilization): it is ignored, not taken as an idle pod."""
    qps = report.rps_fractional
    utilization = report.load
    if qps <= 0 or utilization <= 0:
        return 0.0
    return qps / (utilization + report.eps / qps * error_penalty)


class LaneLoad:
    """What a lane's pod reported, and the weight the picker uses (A58's per-endpoint state).

    Attributes:
        weight: the last report's weight.
        non_empty_since: when the current series of reports began (None: none yet).
        last_update: when the last report with a weight came.
        effective: the weight the picker uses, set at each update (0: none usable).
        reports: reports received (with or without a weight).
        passed: the picker's stride-scheduling pass (grows by ``1 / effective`` per call).
        ewma: the Peak-EWMA of its calls' latency (seconds; see :meth:`timed`).
        ewma_at: when ``ewma`` last changed (None: no call timed yet).
        read_after: the next report is read from a call that ends after this (the pool's
            clock at its last plan): see :data:`READ_EVERY_S`.
    """

    __slots__ = (
        "effective",
        "ewma",
        "ewma_at",
        "last_update",
        "non_empty_since",
        "passed",
        "read_after",
        "reports",
        "weight",
    )

    def __init__(self) -> None:
        self.weight = 0.0
        self.non_empty_since: float | None = None
        self.last_update = 0.0
        self.effective = 0.0
        self.reports = 0
        self.passed = 0.0
        self.read_after = 0.0
        self.ewma = 0.0
        self.ewma_at: float | None = None

    def __repr__(self) -> str:
        return f"LaneLoad(weight={self.weight:.3g}, effective={self.effective:.3g})"

    def add(self, report: LoadReport, now: float, config: WeightConfig) -> None:
        """One report, received at ``now``."""
        self.reports += 1
        self.read_after = now + READ_EVERY_S
        weight = report_weight(report, config.error_penalty)
        if weight <= 0:
            return
        if self.non_empty_since is None:
            self.non_empty_since = now
        self.last_update = now
        self.weight = weight

    def timed(self, latency: float, now: float, tau_s: float) -> None:
        """One call took ``latency`` seconds, ending at ``now``: Peak-EWMA. A higher latency
        is taken at once (a pod that slows down is avoided from its first slow answer); a
        lower one is averaged in with weight ``1 - exp(-elapsed / tau_s)``, so the average
        forgets a peak over ``tau_s`` seconds of answers."""
        at = self.ewma_at
        if at is None or latency >= self.ewma:
            self.ewma = latency
        else:
            keep = math.exp(-(now - at) / tau_s)
            self.ewma = self.ewma * keep + latency * (1.0 - keep)
        self.ewma_at = now

    def usable(self, now: float, config: WeightConfig) -> float:
        """The weight to use at ``now``, 0 if none: none yet, in its blackout, or expired (an
        expired weight restarts the blackout)."""
        since = self.non_empty_since
        if since is None:
            return 0.0
        if now - self.last_update >= config.expiration_s:
            self.non_empty_since = None
            return 0.0
        if now - since < config.blackout_s:
            return 0.0
        return self.weight
