"""OpenTelemetry for the observing interceptors: spans, alarm events, metrics, warnings, a callback.

Through the OpenTelemetry API only: the application owns the SDK and passes its providers (or
sets the global ones). Every step is behind a guard that logs and swallows, so telemetry can never
fail or change a call.

Spans follow the rpc semantic conventions (``rpc.system``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code``, ``server.address``, ``server.port``) and add the serving pod and lane
under ``grpc_balance_mw.*``. When opentelemetry-instrumentation-grpc's client span is the current
span (its interceptor runs outside this one), that span is enriched and no second span is made.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from grpc_balance_mw.affinity.detector import Clock
from grpc_balance_mw.affinity.observer import CallObserver, ObservedCall
from grpc_balance_mw.affinity.state import PodEvent, Transition
from grpc_balance_mw.instrumentation import instrumentor_active

_log = logging.getLogger(__name__)

SCOPE = "grpc_balance_mw"
ATTR_POD = "grpc_balance_mw.pod"
ATTR_LANE = "grpc_balance_mw.lane"
ATTR_TARGET = "grpc_balance_mw.target"
ATTR_STATE = "grpc_balance_mw.affinity.state"
EVENT_STATE_CHANGE = "grpc_balance_mw.affinity.state_change"
#: Span events when a pod becomes known or stops being known (``PodEvent.kind`` appended).
EVENT_POD_PREFIX = "grpc_balance_mw.affinity."
ATTR_CAUSE = "grpc_balance_mw.affinity.cause"
ATTR_ADVICE = "grpc_balance_mw.affinity.advice"
METRIC_CALLS = "grpc_balance_mw.client.calls"
METRIC_TOP_SHARE = "grpc_balance_mw.affinity.top_share"
#: The pod value of calls whose response named no pod, and of pods beyond the cap.
UNKNOWN_POD = "unknown"
OTHER_POD = "other"

AlarmCallback = Callable[[Transition], None]
#: Metric attribute sets kept for reuse; pods beyond ``max_pod_values`` share ``other``'s.
_MAX_ATTRIBUTE_SETS = 4096

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:]+))(?::(?P<port>\d+))?$")


def server_address(target: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a gRPC target string.

    ``host:port``, ``[v6]:port``, ``dns:///host:port``, ``dns://resolver/host:port`` and
    ``ipv4:host:port`` give the host and port the channel asks for; anything else is returned
    whole, without a port.
    """
    rest = target
    if "://" in rest:
        rest = rest.split("://", 1)[1].split("/", 1)[-1]
    elif rest.startswith(("ipv4:", "ipv6:", "dns:")):
        rest = rest.split(":", 1)[1].split(",", 1)[0]
    match = _HOST_PORT.match(rest)
    if match is None:
        return target, None
    port = match.group("port")
    return match.group("v6") or match.group("host"), int(port) if port else None


class _CallCount:
    """Calls with one set of metric attributes: ticked per call, read by the metric reader."""

    __slots__ = ("_reads", "attributes", "ticks")

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.attributes = attributes
        self.ticks = itertools.count()
        self._reads = 0

    def read(self) -> int:
        """Calls so far (each read takes one tick of its own, subtracted here)."""
        ticked = next(self.ticks) - self._reads
        self._reads += 1
        return ticked


class AffinityTelemetry:
    """Spans, alarm events, metrics, a rate-limited warning and a callback for affinity.

    Args:
        tracer_provider: the SDK's tracer provider; default the global one.
        meter_provider: the SDK's meter provider; default the global one.
        spans: make (or enrich) a CLIENT span per call.
        metrics: count calls by pod and report each target's top share.
        on_alarm: called with every state change of a watched target; its errors are logged.
        warn_interval_s: at most one warning per target per this many seconds.
        max_pod_values: distinct pod values per target in metrics; the rest count as ``other``
            so a server that stamps random names cannot blow up metric cardinality.
        clock: monotonic seconds, for the warning's rate limit.
    """

    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
        spans: bool = True,
        metrics: bool = True,
        on_alarm: AlarmCallback | None = None,
        warn_interval_s: float = 300.0,
        max_pod_values: int = 64,
        clock: Clock = time.monotonic,
    ) -> None:
        from grpc_balance_mw import __version__

        self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider) if spans else None
        self._on_alarm = on_alarm
        self._warn_interval_s = warn_interval_s
        self._max_pod_values = max_pod_values
        self._clock = clock
        self._lock = threading.Lock()
        self._observers: dict[str, CallObserver] = {}
        self._pod_values: dict[str, set[str]] = {}
        self._warned_at: dict[str, float] = {}
        self._span_attributes: dict[tuple[int, str], dict[str, Any]] = {}
        #: Call counts per (target, pod, service, code) as calls name them, and per attribute
        #: set as the metric reports them (pods beyond the cap share ``other``'s).
        self._call_counts: dict[tuple[str, str | None, str, int | None], _CallCount] = {}
        self._counts_by_attributes: dict[tuple[str, str, str, int | None], _CallCount] = {}
        self._calls = metrics
        if metrics:
            meter = otel_metrics.get_meter(SCOPE, __version__, meter_provider)
            # An observable counter that reads counts kept here: a call costs one tick of an
            # itertools.count, not the SDK's attribute hashing and aggregation per call.
            meter.create_observable_counter(
                METRIC_CALLS,
                callbacks=[self._observe_calls],
                unit="{call}",
                description="Client calls by the pod that served them",
            )
            meter.create_observable_gauge(
                METRIC_TOP_SHARE,
                callbacks=[self._observe_top_share],
                unit="1",
                description="Share of the target's recent calls served by its busiest pod",
            )

    def __repr__(self) -> str:
        return f"<AffinityTelemetry watching {len(self._observers)} targets>"

    # CallTelemetry

    def watch(self, observer: CallObserver) -> None:
        with self._lock:
            self._observers.setdefault(observer.target, observer)

    def call_started(self, call: ObservedCall) -> None:
        try:
            current = trace.get_current_span()
            if current.is_recording() and self._is_grpc_client_span(current, call):
                call.span, call.telemetry_state = current, False
            elif self._tracer is not None and not instrumentor_active():
                call.span = self._tracer.start_span(
                    f"{call.method.service}/{call.method.method}",
                    kind=SpanKind.CLIENT,
                    attributes=self._start_attributes(call),
                )
                call.telemetry_state = True
        except Exception:  # telemetry must never fail the call
            _log.debug("could not start the call's span", exc_info=True)

    def pod_seen(self, call: ObservedCall) -> None:
        try:
            if call.span is not None and call.pod is not None:
                call.span.set_attribute(ATTR_POD, call.pod)
        except Exception:  # telemetry must never fail the call
            _log.debug("could not set the pod on the span", exc_info=True)

    def call_finished(
        self, call: ObservedCall, code: int | None, transition: Transition | None
    ) -> None:
        if call.observer.detector.pod_events:
            self._pod_events(call)  # before the span ends
        try:
            self._finish_span(call, code, transition)
        except Exception:  # telemetry must never fail the call
            _log.debug("could not finish the call's span", exc_info=True)
        try:
            if self._calls:
                self._count(call, code)
        except Exception:  # telemetry must never fail the call
            _log.debug("could not count the call", exc_info=True)
        if transition is not None:
            self._alarm(transition)

    def _pod_events(self, call: ObservedCall) -> None:
        """Pods that became known or went away: an event on this call's span, a log line."""
        try:
            events = call.observer.detector.take_pod_events()
        except Exception:  # telemetry must never fail the call
            _log.debug("could not read the pod events", exc_info=True)
            return
        for event in events:
            self._pod_event(call.span, event)

    def _pod_event(self, span: Any, event: PodEvent) -> None:
        try:
            _log.info(
                "grpc_balance_mw: %s %s of %s (from %s)",
                event.kind,
                event.pod,
                event.target,
                event.source,
            )
            if span is not None:
                span.add_event(
                    EVENT_POD_PREFIX + event.kind,
                    {ATTR_POD: event.pod, ATTR_TARGET: event.target, "source": event.source},
                )
        except Exception:  # telemetry must never fail the call
            _log.debug("could not report the pod event", exc_info=True)

    # spans

    @staticmethod
    def _is_grpc_client_span(span: Any, call: ObservedCall) -> bool:
        """Whether ``span`` is another instrumentation's span for this very call."""
        name = getattr(span, "name", None)
        return getattr(span, "kind", None) is SpanKind.CLIENT and name in (
            call.method.full,
            call.method.full.lstrip("/"),
        )

    def _start_attributes(self, call: ObservedCall) -> dict[str, Any]:
        key = (id(call.observer), call.method.full)
        attributes = self._span_attributes.get(key)
        if attributes is None:
            address, port = server_address(call.observer.target)
            attributes = {
                "rpc.system": "grpc",
                "rpc.service": call.method.service,
                "rpc.method": call.method.method,
                "server.address": address,
            }
            if port is not None:
                attributes["server.port"] = port
            if call.observer.lane is not None:
                attributes[ATTR_LANE] = call.observer.lane
            self._span_attributes[key] = attributes
        return attributes

    def _finish_span(
        self, call: ObservedCall, code: int | None, transition: Transition | None
    ) -> None:
        span = call.span
        if span is None:
            return
        owned = call.telemetry_state is True
        # One set_attributes: each set_attribute call takes the span's lock again.
        attributes: dict[str, Any] = {ATTR_POD: call.pod if call.pod is not None else UNKNOWN_POD}
        if not owned and call.observer.lane is not None:
            attributes[ATTR_LANE] = call.observer.lane
        state = call.observer.detector.state
        if state.is_alarm:
            attributes[ATTR_STATE] = state.value
        if owned and code is not None:
            attributes["rpc.grpc.status_code"] = code
        span.set_attributes(attributes)
        if transition is not None:
            snapshot = transition.snapshot
            event: dict[str, Any] = {
                "grpc_balance_mw.affinity.previous": transition.previous.value,
                ATTR_STATE: transition.current.value,
                "grpc_balance_mw.affinity.top_pod": snapshot.top_pod or UNKNOWN_POD,
                "grpc_balance_mw.affinity.top_share": snapshot.top_share,
                "grpc_balance_mw.affinity.known_pods": snapshot.known_count,
                "grpc_balance_mw.affinity.connections": snapshot.connections,
                "grpc_balance_mw.affinity.lanes": snapshot.lanes,
                ATTR_TARGET: transition.target,
            }
            if snapshot.cause is not None:
                event[ATTR_CAUSE] = snapshot.cause
            if snapshot.advice is not None:
                event[ATTR_ADVICE] = snapshot.advice
            span.add_event(EVENT_STATE_CHANGE, event)
        if not owned:
            return
        if code is not None and code != 0:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # metrics

    def _pod_value(self, target: str, pod: str | None) -> str:
        if pod is None:
            return UNKNOWN_POD
        seen = self._pod_values.get(target)
        if seen is None:
            seen = self._pod_values.setdefault(target, set())
        if pod in seen:
            return pod
        with self._lock:
            if len(seen) >= self._max_pod_values:
                return OTHER_POD
            seen.add(pod)
        return pod

    def _count(self, call: ObservedCall, code: int | None) -> None:
        key = (call.observer.target, call.pod, call.method.service, code)
        count = self._call_counts.get(key)
        if count is None:
            count = self._new_count(key)
        next(count.ticks)  # atomic under the GIL: no lock on the call path

    def _new_count(self, key: tuple[str, str | None, str, int | None]) -> _CallCount:
        target, pod, service, code = key
        value = (target, self._pod_value(target, pod), service, code)
        with self._lock:
            count = self._counts_by_attributes.get(value)
            if count is None:
                attributes: dict[str, Any] = {
                    ATTR_TARGET: target,
                    ATTR_POD: value[1],
                    "rpc.service": service,
                }
                if code is not None:
                    attributes["rpc.grpc.status_code"] = code
                count = self._counts_by_attributes[value] = _CallCount(attributes)
            if len(self._call_counts) >= _MAX_ATTRIBUTE_SETS:
                self._call_counts.clear()  # only the shortcut: the counts stay
            self._call_counts[key] = count
        return count

    def _observe_calls(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        with self._lock:
            counts = list(self._counts_by_attributes.values())
            return [otel_metrics.Observation(count.read(), count.attributes) for count in counts]

    def _observe_top_share(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        with self._lock:
            observers = list(self._observers.values())
        return [
            otel_metrics.Observation(observer.detector.top_share, {ATTR_TARGET: observer.target})
            for observer in observers
        ]

    # alarms

    def _alarm(self, transition: Transition) -> None:
        try:
            if transition.current.is_alarm:
                self._warn(transition)
            else:
                _log.info(
                    "grpc_balance_mw: calls to %s are %s now (were %s)",
                    transition.target,
                    transition.current.value,
                    transition.previous.value,
                )
        except Exception:  # logging must never fail the call
            _log.debug("could not log the affinity alarm", exc_info=True)
        if self._on_alarm is not None:
            try:
                self._on_alarm(transition)
            except Exception:  # the user's hook: its errors are its own
                _log.exception("on_alarm callback raised for %s", transition.target)

    def _warn(self, transition: Transition) -> None:
        now = self._clock()
        last = self._warned_at.get(transition.target)
        if last is not None and now - last < self._warn_interval_s:
            return
        self._warned_at[transition.target] = now
        snapshot = transition.snapshot
        _log.warning(
            "grpc_balance_mw: calls to %s are %s: %.0f%% of recent calls went to pod %s, "
            "%d pods are known (%s); %d connection(s) seen on %d lane(s). Cause: %s. Fix: %s.",
            transition.target,
            transition.current.value,
            snapshot.top_share * 100,
            snapshot.top_pod,
            snapshot.known_count,
            ", ".join(f"{n} from {source}" for source, n in snapshot.known_from.items() if n),
            snapshot.connections,
            snapshot.lanes,
            snapshot.cause or "unknown",
            snapshot.advice or "spread the calls over several connections",
        )
