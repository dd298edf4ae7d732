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
import math
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from grpc_balance_mw._version import __version__
from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.advice import VOICES, Cause, advice, say
from grpc_balance_mw.affinity.detector import AffinityDetector, Clock, evidence_of
from grpc_balance_mw.affinity.observer import CallObserver, ObservedCall
from grpc_balance_mw.affinity.state import AffinityState, Transition
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
#: 1 for each target's current state, 0 for the detector's other states; the state is in
#: ``ATTR_STATE``, as on spans. A state set (as kube-state-metrics' ``phase`` gauges): an alert
#: reads ``== 1`` for one state, and a new state needs no new code number.
METRIC_STATE = "grpc_balance_mw.affinity.state"
#: Pods a balanced channel's outlier ejection ejected (a count), and those ejected now.
METRIC_EJECTIONS = "grpc_balance_mw.pool.ejections"
METRIC_EJECTED = "grpc_balance_mw.pool.ejected_pods"
#: The pod value of calls whose response named no pod, and of pods beyond the cap.
UNKNOWN_POD = "unknown"
OTHER_POD = "other"

AlarmCallback = Callable[[Transition], None]
#: Where the telemetry keeps its per-target state in ``CallObserver.telemetry_cache`` (the
#: rest of that cache is span attributes by method, whose names start with "/").
_TARGET_KEY = "target"
#: The on_alarm thread ends after this long without an alarm.
_ALARM_THREAD_IDLE_S = 10.0
#: Pod event log lines per target per ``alarm_interval_s`` at most.
_POD_LOGS = 8
#: Span attribute sets kept per observer (one per method called through it).
_MAX_CACHED_METHODS = 256
#: Shortcuts from a call's (pod, service, code) to its metric count, per target; pods beyond
#: ``max_pod_values`` share ``other``'s count, so the counts themselves stay bounded.
_MAX_COUNT_KEYS = 4096

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


class _TargetState:
    """What the telemetry keeps per target; held by the target's observers, so it goes with
    them (the telemetry itself only holds it weakly)."""

    __slots__ = (
        "__weakref__",
        "alarmed_at",
        "call_counts",
        "counts_by_attributes",
        "detector",
        "logged_at",
        "pod_logged_at",
        "pod_logs",
        "pod_values",
        "target",
        "warned_at",
    )

    def __init__(self, target: str, detector: AffinityDetector) -> None:
        self.target = target
        self.detector = detector
        self.pod_values: set[str] = set()
        #: Call counts by (pod, service, code) as calls name them, and by the metric's
        #: attribute values (pods beyond the cap share ``other``'s count).
        self.call_counts: dict[tuple[str | None, str, int | None], _CallCount] = {}
        self.counts_by_attributes: dict[tuple[str, str, int | None], _CallCount] = {}
        self.warned_at = -math.inf
        self.logged_at = -math.inf
        self.pod_logged_at = -math.inf
        self.pod_logs = 0
        self.alarmed_at = -math.inf


class _AlarmWorker:
    """Runs the user's ``on_alarm`` on one background thread, off every call's path.

    The queue is bounded: when it is full (a callback slower than the alarms), new alarms are
    dropped and counted. Whatever the callback raises, ``BaseException`` included, is logged and
    the thread goes on.
    """

    def __init__(self, callback: AlarmCallback, max_pending: int) -> None:
        self._callback = callback
        self._max_pending = max_pending
        self.reset_after_fork()
        self.dropped = 0
        self.delivered = 0

    def reset_after_fork(self) -> None:
        """Fresh lock and queue; the parent's thread does not exist in a forked child."""
        self._wake = threading.Condition(threading.Lock())
        self._queue: deque[Transition] = deque()
        self._thread: threading.Thread | None = None
        self._busy = False

    def submit(self, transition: Transition) -> None:
        with self._wake:
            if len(self._queue) >= self._max_pending:
                self.dropped += 1
                return
            self._queue.append(transition)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="grpc_balance_mw on_alarm", daemon=True
                )
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    # An idle thread ends, so a dropped telemetry leaves none behind; the next
                    # alarm starts another.
                    if not self._wake.wait(_ALARM_THREAD_IDLE_S) and not self._queue:
                        self._thread = None
                        return
                transition = self._queue.popleft()
                self._busy = True
            try:
                self._callback(transition)
            except BaseException:  # the user's hook: its errors, even SystemExit, are its own
                _log.exception("on_alarm callback raised for %s", transition.target)
            finally:
                with self._wake:
                    self._busy = False
                    self.delivered += 1
                    self._wake.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued alarm was delivered; False if ``timeout`` passed first."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._queue and not self._busy, timeout)


def _lane_name(call: ObservedCall) -> str | None:
    """The lane a span names, once the observer's lane is named: the call's own lane, which for
    an interceptor installed on several channels is its channel's (``<name>.<n>`` after the
    first), as the detector's snapshot counts them."""
    named = call.observer.lane
    if named is None:
        return None
    lane = call.lane
    return lane.name if lane is not None else named


def _state_observations(state: _TargetState) -> list[otel_metrics.Observation]:
    """The state gauge of one target: 1 for its current state, 0 for every other state of the
    detector's own enum (a state added there shows here without a change), so a state left
    reads 0 instead of vanishing."""
    current = state.detector.state
    return [
        otel_metrics.Observation(
            int(member is current), {ATTR_TARGET: state.target, ATTR_STATE: member.value}
        )
        for member in type(current)
    ]


class AffinityTelemetry:
    """Spans, alarm events, metrics, a rate-limited warning and a callback for affinity.

    Args:
        tracer_provider: the SDK's tracer provider; default the global one.
        meter_provider: the SDK's meter provider; default the global one.
        spans: make (or enrich) a CLIENT span per call.
        metrics: count calls by pod and report each target's top share and state
            (see docs/metrics.md).
        on_alarm: called with state changes of a watched target, on a background thread of its
            own (never on a call's path), at most once per target per ``alarm_interval_s``; its
            errors are logged.
        warn_interval_s: at most one warning per target per this many seconds.
        alarm_interval_s: at most one ``on_alarm`` call and one INFO log per target per this
            many seconds; a server that makes the state flap cannot flood either. The changes
            in between are counted in :attr:`alarms_suppressed`; the state itself is always on
            the detector and on later spans.
        max_pending_alarms: ``on_alarm`` calls waiting for the background thread at most;
            more are dropped and counted in :attr:`alarms_dropped`.
        max_pod_values: distinct pod values per target in metrics; the rest count as ``other``
            so a server that stamps random names cannot blow up metric cardinality.
        clock: monotonic seconds, for the rate limits.

    Building it never raises: a provider that fails leaves spans or metrics off, logged.
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
        alarm_interval_s: float = 5.0,
        max_pending_alarms: int = 100,
        max_pod_values: int = 64,
        clock: Clock = time.monotonic,
    ) -> None:
        self._tracer: trace.Tracer | None = None
        if spans:
            try:
                self._tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
            except Exception:  # telemetry must never fail the application
                _log.warning("grpc_balance_mw: no spans, the tracer provider failed", exc_info=True)
        self._on_alarm = on_alarm
        self._alarms = _AlarmWorker(on_alarm, max(max_pending_alarms, 1)) if on_alarm else None
        self._warn_interval_s = warn_interval_s
        self._alarm_interval_s = alarm_interval_s
        self._max_pod_values = max_pod_values
        self._clock = clock
        self._lock = threading.Lock()
        self._targets: weakref.WeakValueDictionary[str, _TargetState] = (
            weakref.WeakValueDictionary()
        )
        #: State changes not passed to ``on_alarm`` (nor logged at INFO) for the rate limit.
        self.alarms_suppressed = 0
        #: Pod events put on spans but left out of the log for its rate limit.
        self.pod_events_unlogged = 0
        self._calls = False
        if metrics:
            try:
                meter = otel_metrics.get_meter(SCOPE, __version__, meter_provider)
                # An observable counter that reads counts kept here: a call costs one tick of
                # an itertools.count, not the SDK hashing a fresh attribute dict per call.
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
                    description="Share of the target's recent calls served by its busiest pod "
                    "(0 while nothing recent named a pod)",
                )
                # No unit: a unit would become a suffix of the Prometheus name.
                meter.create_observable_gauge(
                    METRIC_STATE,
                    callbacks=[self._observe_state],
                    description="1 for the target's current affinity state, 0 for the others",
                )
                meter.create_observable_counter(
                    METRIC_EJECTIONS,
                    callbacks=[self._observe_ejections],
                    unit="{ejection}",
                    description="Pods ejected by the balanced channel's outlier detection "
                    "(their calls failed while their health checks said SERVING)",
                )
                meter.create_observable_gauge(
                    METRIC_EJECTED,
                    callbacks=[self._observe_ejected],
                    unit="{pod}",
                    description="Pods of the target ejected by outlier detection now",
                )
                self._calls = True
            except Exception:  # telemetry must never fail the application
                _log.warning(
                    "grpc_balance_mw: no metrics, the meter provider failed", exc_info=True
                )
        forking.track(self)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock, and an alarm thread started anew when needed."""
        self._lock = threading.Lock()
        if self._alarms is not None:
            self._alarms.reset_after_fork()

    def __repr__(self) -> str:
        return f"<AffinityTelemetry watching {len(self._targets)} targets>"

    @property
    def alarms_dropped(self) -> int:
        """``on_alarm`` calls dropped because the queue was full."""
        return self._alarms.dropped if self._alarms is not None else 0

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until ``on_alarm`` has been called for every queued alarm (tests, shutdown)."""
        return self._alarms.flush(timeout) if self._alarms is not None else True

    def _target(self, observer: CallObserver) -> _TargetState:
        state: _TargetState | None = observer.telemetry_cache.get(_TARGET_KEY)
        if state is None:
            with self._lock:
                state = self._targets.get(observer.target)
                if state is None:
                    state = _TargetState(observer.target, observer.detector)
                    self._targets[observer.target] = state
            observer.telemetry_cache[_TARGET_KEY] = state
        return state

    # CallTelemetry

    def watch(self, observer: CallObserver) -> None:
        try:
            self._target(observer)
        except Exception:  # telemetry must never fail the channel
            _log.debug("could not watch the observer", exc_info=True)

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
            try:
                self._alarm(self._target(call.observer), transition)
            except Exception:  # telemetry must never fail the call
                _log.debug("could not raise the affinity alarm", exc_info=True)

    def _pod_events(self, call: ObservedCall) -> None:
        """Pods that became known or went away: an event each on this call's span, and a log
        line, at most ``_POD_LOGS`` per target per ``alarm_interval_s`` (a server that makes up
        a pod name per call cannot flood the log; the rest are counted in
        ``pod_events_unlogged``)."""
        try:
            events = call.observer.detector.take_pod_events()
            span = call.span
            if span is not None:
                for event in events:
                    attributes = {
                        ATTR_POD: event.pod,
                        ATTR_TARGET: event.target,
                        "source": event.source,
                    }
                    if event.kind == "pod_gone":  # the table's words, as every voice's
                        attributes[ATTR_CAUSE] = Cause.PODS_LEAVING.value
                        attributes[ATTR_ADVICE] = advice(Cause.PODS_LEAVING)
                    span.add_event(EVENT_POD_PREFIX + event.kind, attributes)
            state = self._target(call.observer)
            now = self._clock()
            if now - state.pod_logged_at >= self._alarm_interval_s:
                state.pod_logged_at, state.pod_logs = now, 0
            if state.pod_logs >= _POD_LOGS:
                self.pod_events_unlogged += len(events)
                return
            state.pod_logs += 1
            leaving = any(e.kind == "pod_gone" for e in events)
            _log.info(
                "grpc_balance_mw: %s: %s%s",
                call.observer.target,
                ", ".join(f"{e.kind} {e.pod} (from {e.source})" for e in events),
                f". {VOICES[Cause.PODS_LEAVING].sentence}" if leaving else "",
            )
        except Exception:  # telemetry must never fail the call
            _log.debug("could not report the pod events", exc_info=True)

    # spans

    @staticmethod
    def _is_grpc_client_span(span: Any, call: ObservedCall) -> bool:
        """Whether ``span`` is another instrumentation's span for this very call."""
        name = getattr(span, "name", None)
        return getattr(span, "kind", None) is SpanKind.CLIENT and name in (
            call.method.full,
            call.method.full.lstrip("/"),
        )

    @staticmethod
    def _start_attributes(call: ObservedCall) -> dict[str, Any]:
        # Kept on the observer: they name its lane and target, and go with it.
        cache = call.observer.telemetry_cache
        lane = _lane_name(call)
        key = call.method.full if lane is None else (call.method.full, lane)
        attributes: dict[str, Any] | None = cache.get(key)
        if attributes is None:
            if len(cache) > _MAX_CACHED_METHODS:  # a generic client may name any method
                target = cache.get(_TARGET_KEY)
                cache.clear()
                if target is not None:
                    cache[_TARGET_KEY] = target
            address, port = server_address(call.observer.target)
            attributes = {
                "rpc.system": "grpc",
                "rpc.service": call.method.service,
                "rpc.method": call.method.method,
                "server.address": address,
            }
            if port is not None:
                attributes["server.port"] = port
            if lane is not None:
                attributes[ATTR_LANE] = lane
            cache[key] = attributes
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
            attributes[ATTR_LANE] = _lane_name(call)
        state = call.observer.detector.state
        if state.is_alarm or state is AffinityState.UNIDENTIFIED:
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

    def _pod_value(self, state: _TargetState, pod: str | None) -> str:
        if pod is None:
            return UNKNOWN_POD
        seen = state.pod_values
        if pod in seen:
            return pod
        with self._lock:
            if len(seen) >= self._max_pod_values:
                return OTHER_POD
            seen.add(pod)
        return pod

    def _count(self, call: ObservedCall, code: int | None) -> None:
        state = self._target(call.observer)
        key = (call.pod, call.method.service, code)
        count = state.call_counts.get(key)
        if count is None:
            count = self._new_count(state, key)
        next(count.ticks)  # atomic under the GIL: no lock on the call path

    def _new_count(
        self, state: _TargetState, key: tuple[str | None, str, int | None]
    ) -> _CallCount:
        pod, service, code = key
        value = (self._pod_value(state, pod), service, code)
        with self._lock:
            count = state.counts_by_attributes.get(value)
            if count is None:
                attributes: dict[str, Any] = {
                    ATTR_TARGET: state.target,
                    ATTR_POD: value[0],
                    "rpc.service": service,
                }
                if code is not None:
                    attributes["rpc.grpc.status_code"] = code
                count = state.counts_by_attributes[value] = _CallCount(attributes)
            if len(state.call_counts) >= _MAX_COUNT_KEYS:
                state.call_counts.clear()  # only the shortcut: the counts stay
            state.call_counts[key] = count
        return count

    def _observe_calls(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        with self._lock:
            counts = [
                count
                for state in list(self._targets.values())
                for count in state.counts_by_attributes.values()
            ]
            return [otel_metrics.Observation(count.read(), count.attributes) for count in counts]

    def _observe_each(
        self, read: Callable[[_TargetState], list[otel_metrics.Observation]]
    ) -> list[otel_metrics.Observation]:
        """``read`` of every watched target, brought up to date first; a target whose detector
        fails is logged and left out, the others are still reported."""
        with self._lock:
            states = list(self._targets.values())
        observations: list[otel_metrics.Observation] = []
        for state in states:
            try:
                # The metric reader calls the gauges even when no call is made: the one place
                # that sees a window go stale after the calls stopped, and says so (once, from
                # whichever gauge reads it first).
                stale = state.detector.expire()
                if stale is not None:
                    self._alarm(state, stale)
                observations += read(state)
            except Exception:  # telemetry must never fail the reader
                _log.debug("could not observe %s", state.target, exc_info=True)
        return observations

    def _observe_top_share(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        return self._observe_each(
            lambda state: [
                otel_metrics.Observation(state.detector.top_share, {ATTR_TARGET: state.target})
            ]
        )

    def _observe_state(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        return self._observe_each(_state_observations)

    def _observe_ejections(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        return self._observe_each(
            lambda state: [
                otel_metrics.Observation(state.detector.ejections, {ATTR_TARGET: state.target})
            ]
        )

    def _observe_ejected(self, _options: Any) -> Iterable[otel_metrics.Observation]:
        return self._observe_each(
            lambda state: [
                otel_metrics.Observation(
                    len(state.detector.ejected_pods), {ATTR_TARGET: state.target}
                )
            ]
        )

    # alarms

    def _alarm(self, state: _TargetState, transition: Transition) -> None:
        now = self._clock()
        due = now - state.alarmed_at >= self._alarm_interval_s
        try:
            if transition.current.is_alarm:
                self._warn(state, transition, now)
            elif due:
                _log.info(
                    "grpc_balance_mw: calls to %s are %s now (were %s)%s",
                    transition.target,
                    transition.current.value,
                    transition.previous.value,
                    ": no recent call named a pod" if transition.stale else "",
                )
        except Exception:  # logging must never fail the call
            _log.debug("could not log the affinity alarm", exc_info=True)
        if not due:
            self.alarms_suppressed += 1
            return
        state.alarmed_at = now
        if self._alarms is not None:
            self._alarms.submit(transition)

    def _warn(self, state: _TargetState, transition: Transition, now: float) -> None:
        if now - state.warned_at < self._warn_interval_s:
            return
        state.warned_at = now
        if transition.announced:  # the detector just said it, in the same words
            return
        snapshot = transition.snapshot
        cause = Cause(snapshot.cause) if snapshot.cause is not None else Cause.SINGLE_CONNECTION
        line = say(transition.target, cause, transition.current.value, evidence_of(snapshot))
        if snapshot.advice is not None and snapshot.advice != advice(cause):
            line += f" Now: {snapshot.advice}."  # the calls already moved onto lanes
        _log.warning("%s", line)
