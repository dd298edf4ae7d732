"""The ways a client can reach the pods, opened side by side for ``bench`` and ``demo``.

Each strategy is one of the answers to "one channel through a ClusterIP Service pins every call
to one pod", made the way a user would make it, and opened against a :class:`LocalCluster`:

* ``plain``: one channel through the Service (the problem);
* ``dial-per-request``: the package's fallback, a new connection per call, GetChargePoint
  marked retryable;
* ``headless-round-robin``: :func:`headless_channel` over the headless Service's DNS name;
* ``server-max-age``: a plain channel to pods that close each connection after 2 s (gRFC A9);
  those pods are a cluster of their own;
* ``l7-proxy``: one channel to an L7 proxy that balances per call (HAProxy h2, Envoy's
  stand-in);
* ``interceptors``: a plain channel observed (:func:`observe`) with spans: the alarm, no fix;
* ``balanced``: :func:`balanced_channel` with its default picker, GetChargePoint marked
  retryable;
* ``balanced-p2c``: the same with :class:`~grpc_balance_mw.pool.LeastOutstanding` (in-flight
  calls, power of two choices) passed explicitly, so it keeps that picker when the default
  changes: the comparison for a new picker;
* ``balanced-predial``: the fallback with connections dialled ahead of need;
* ``balanced-subset``: ``balanced`` with ``PoolConfig(subset=SubsetRule())``: lanes are
  redialled away from pods that report far more connections than the mean (many clients with
  few lanes each; the ``fleet`` scenario).

Every strategy that observes has an affinity registry of its own, so two strategies on the same
target never share a detector.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.balanced import BalancedChannel, balanced_channel
from grpc_balance_mw.cli import STRATEGIES, SUBSET_STRATEGY
from grpc_balance_mw.dial_per_request import dial_per_request_channel
from grpc_balance_mw.headless_channel import headless_channel
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool, LeastOutstanding, PoolConfig
from grpc_balance_mw.retry import RetryPolicy
from grpc_balance_mw.subset import SubsetRule
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

__all__ = [
    "GET_CHARGE_POINT",
    "STRATEGIES",
    "Opened",
    "Result",
    "Targets",
    "channel_for",
    "ejections_of",
    "max_share_over_fair",
    "open_strategy",
    "percentile",
    "unavailable_strategies",
]

GET_CHARGE_POINT = "/chargepoints.v1.ChargePoints/GetChargePoint"
#: The server-max-age strategy's pods close each connection after about this long.
MAX_AGE_S = 2.0
#: Connections the balanced-predial strategy keeps dialled ahead.
PREDIAL = 2
#: A channel of its own: gRPC core would otherwise share one connection between the plain
#: channels of several strategies with the same target.
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


@dataclass
class Result:
    """One strategy in one scenario: an entry of the JSON document's ``scenarios``."""

    name: str
    strategy: str
    calls: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    per_pod: dict[str, int] = field(default_factory=dict)
    max_share_over_fair: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    alarm: str | None = None
    seconds_to_new_pod_traffic: float | None = None
    note: str | None = None
    variant: str | None = None
    windows: list[dict[str, Any]] = field(default_factory=list)
    #: Pods the balanced channel's outlier detection ejected: ``{"count", "pods": {pod: times}}``
    #: (None: a strategy without one).
    ejections: dict[str, Any] | None = None
    #: A scenario's own figures, entries of the document beside the common fields.
    figures: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("note", "variant"):
            if data[optional] is None:
                del data[optional]
        if self.name != "scale-up":
            del data["seconds_to_new_pod_traffic"]
        return {**data.pop("figures"), **data}

    def count(self, served: dict[str, int]) -> None:
        for pod, calls in served.items():
            self.per_pod[pod] = self.per_pod.get(pod, 0) + calls

    def failed(self, code: grpc.StatusCode | None) -> None:
        name = code.name if code is not None else "UNKNOWN"
        self.errors += 1
        self.error_codes[name] = self.error_codes.get(name, 0) + 1

    def finish(self, latencies_ms: Sequence[float], pods: int) -> Result:
        """Fill the spread and the percentiles; ``pods``: how many a fair share divides by."""
        self.max_share_over_fair = max_share_over_fair(self.per_pod, pods)
        if latencies_ms:
            self.p50_ms = round(percentile(latencies_ms, 0.50), 3)
            self.p99_ms = round(percentile(latencies_ms, 0.99), 3)
        return self


def max_share_over_fair(per_pod: dict[str, int], pods: int) -> float | None:
    """The busiest pod's calls over a fair share (1.0: perfectly even; ``pods``: all on one)."""
    total = sum(per_pod.values())
    if total == 0 or pods <= 0:
        return None
    return round(max(per_pod.values()) / (total / pods), 3)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (no interpolation: a value that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


@dataclass
class Opened:
    """One strategy's channel, ready for calls.

    Attributes:
        strategy: its name.
        channel: what the stub was made from.
        stub: a ``ChargePointsStub`` on it.
        cluster: the cluster it reaches (server-max-age has its own).
        detector: the affinity detector that watches it, for those that observe.
        close: closes the channel.
    """

    strategy: str
    channel: grpc.Channel
    stub: Any
    cluster: LocalCluster
    detector: AffinityDetector | None = None
    close: Callable[[], None] = lambda: None

    @property
    def alarm(self) -> str | None:
        return self.detector.snapshot().state.value if self.detector is not None else None

    @property
    def ejections(self) -> dict[str, Any] | None:
        return ejections_of(self.channel)

    def report(self, result: Result) -> None:
        """What the channel itself says, into its result: the alarm and the ejections."""
        result.alarm = self.alarm
        result.ejections = self.ejections

    def get(self, request_id: str = "cp-1", timeout: float = 5.0) -> str:
        """One GetChargePoint; the pod that served it (the response's ``served_by``)."""
        request = pb.GetChargePointRequest(id=request_id)
        response = self.stub.GetChargePoint(request, timeout=timeout)
        return str(response.served_by)

    def settle(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until a balanced channel's lanes cover distinct pods, so steady-state
        figures are not its first second's."""
        settle(self.channel, len(self.cluster.endpoints()), timeout_s)


def settle(channel: grpc.Channel, pods: int, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until a balanced channel's lanes cover ``pods`` distinct pods (at most
    its ``min_lanes``); other channels return at once."""
    if not isinstance(channel, BalancedChannel):
        return
    wanted = min(pods, channel.pool.config.min_lanes)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        covered = {lane.pod for lane in channel.pool.lanes if lane.is_available()}
        if len(covered - {None}) >= wanted:
            return
        time.sleep(0.05)


def ejections_of(channel: grpc.Channel) -> dict[str, Any] | None:
    """A balanced channel's (sync or aio) outlier ejections so far, ``{"count", "pods": {pod:
    times}}``; None for a channel without a lane pool."""
    pool = getattr(channel, "pool", None)
    if not isinstance(pool, LanePool):
        return None
    outliers = pool.outliers
    if outliers is None:
        return {"count": 0, "pods": {}}
    return {"count": outliers.ejections, "pods": dict(sorted(outliers.ejected_pods.items()))}


def unavailable_strategies(cluster: LocalCluster) -> dict[str, str]:
    """Strategies this cluster cannot run, and why."""
    missing = {}
    if cluster.dns_kind is None:
        missing["headless-round-robin"] = f"no cluster DNS with service={cluster.service_kind}"
    if cluster.l7_kind is None:
        missing["l7-proxy"] = "no L7 proxy (haproxy is not installed)"
    return missing


def _observe_options(
    expected_pods: int | None, telemetry: AffinityTelemetry | None
) -> ObserveOptions:
    return ObserveOptions(
        expected_pods=expected_pods, telemetry=telemetry, registry=AffinityRegistry()
    )


@dataclass(frozen=True)
class Targets:
    """Where a strategy's channel connects: the Service, and the L7 proxy and the headless
    Service's DNS name where the cluster has them (a client process gets these, not the
    cluster)."""

    service: str
    l7: str | None = None
    headless: str | None = None

    @classmethod
    def of(cls, cluster: LocalCluster) -> Targets:
        return cls(
            cluster.service_target,
            cluster.l7_target if cluster.l7_kind is not None else None,
            cluster.headless_target if cluster.dns_kind is not None else None,
        )


def open_strategy(
    strategy: str,
    cluster: LocalCluster,
    *,
    max_age_cluster: LocalCluster | None = None,
    telemetry: AffinityTelemetry | None = None,
    expected_pods: int | None = 3,
) -> Opened:
    """Open one strategy's channel against ``cluster`` (``max_age_cluster`` for server-max-age).

    Args:
        strategy: one of :data:`STRATEGIES`.
        cluster: the cluster whose Service, DNS or L7 proxy it reaches.
        max_age_cluster: pods started with a connection age, for ``server-max-age``.
        telemetry: the spans and alarms of the observing strategies (``interceptors`` makes
            its own spans if None, dropped: what is measured is making them).
        expected_pods: the replicas the observing strategies are told of (None: not told).
    """
    target_cluster = cluster
    if strategy == "server-max-age":
        if max_age_cluster is None:
            raise ValueError("server-max-age needs the cluster of pods with a connection age")
        target_cluster = max_age_cluster
    channel, detector = channel_for(
        strategy, Targets.of(target_cluster), telemetry=telemetry, expected_pods=expected_pods
    )
    return Opened(
        strategy,
        channel,
        pb_grpc.ChargePointsStub(channel),  # type: ignore[no-untyped-call]
        target_cluster,
        detector,
        channel.close,
    )


def channel_for(
    strategy: str,
    targets: Targets,
    *,
    telemetry: AffinityTelemetry | None = None,
    expected_pods: int | None = 3,
    pool_config: PoolConfig | None = None,
) -> tuple[grpc.Channel, AffinityDetector | None]:
    """One strategy's channel to ``targets`` and the affinity detector that watches it.

    ``server-max-age`` is a plain channel to ``targets.service`` (pods with a connection age);
    ``pool_config``: the balanced strategies' pool (None: the defaults).
    """
    retry = RetryPolicy(methods={GET_CHARGE_POINT})
    channel: grpc.Channel
    detector: AffinityDetector | None = None
    if strategy in ("plain", "server-max-age"):
        channel = grpc.insecure_channel(targets.service, options=[OWN_CONNECTION])
    elif strategy == "l7-proxy":
        if targets.l7 is None:
            raise ValueError("l7-proxy needs a cluster with an L7 proxy")
        channel = grpc.insecure_channel(targets.l7, options=[OWN_CONNECTION])
    elif strategy == "headless-round-robin":
        if targets.headless is None:
            raise ValueError("headless-round-robin needs a cluster with a DNS")
        channel = headless_channel(targets.headless, options=[OWN_CONNECTION], check=False)
    elif strategy == "interceptors":
        plain = grpc.insecure_channel(targets.service, options=[OWN_CONNECTION])
        observed = observe(
            plain, _observe_options(expected_pods, telemetry or _dropped_spans_telemetry())
        )
        channel, detector = observed, observed.detector
    elif strategy in ("balanced", "balanced-p2c", SUBSET_STRATEGY):
        if strategy == SUBSET_STRATEGY:
            pool_config = dataclasses.replace(pool_config or PoolConfig(), subset=SubsetRule())
        balanced = balanced_channel(
            targets.service,
            retry=retry,
            observe=_observe_options(expected_pods, telemetry),
            picker=LeastOutstanding() if strategy == "balanced-p2c" else None,
            pool_config=pool_config,
        )
        channel, detector = balanced, balanced.detector
    elif strategy in ("dial-per-request", "balanced-predial"):
        redial = dial_per_request_channel(
            targets.service,
            retry=retry,
            predial=PREDIAL if strategy == "balanced-predial" else 0,
            observe=_observe_options(expected_pods, telemetry),
        )
        channel = redial
        assert redial.observer is not None
        detector = redial.observer.detector
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return channel, detector


def _dropped_spans_telemetry() -> AffinityTelemetry:
    """Telemetry that makes a span per call through the SDK and drops it."""
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class _Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Drop()))
    return AffinityTelemetry(tracer_provider=provider, metrics=False)
