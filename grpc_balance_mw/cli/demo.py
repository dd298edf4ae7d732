"""``grpc-balance demo``: the problem, the alarm and the fix, on the embedded local cluster.

`omni` calls `charge-points` (3 pods) through a ClusterIP-like Service, in four acts:

1. one plain channel, observed (:func:`observe` with spans): every call on one pod, the pinned
   alarm, and one real span with its pod attribute and the alarm event, printed as the
   OpenTelemetry SDK's ``ConsoleSpanExporter`` prints it;
2. a surge through that channel: the pods get a capacity (8 calls at once, 50 ms each, the rest
   queue) and omni's calls a 250 ms deadline; the pinned pod queues and misses deadlines while
   its siblings idle;
3. the same surge through :func:`balanced_channel`: spread over the three pods;
4. the balanced channel while the Service scales to 5 pods: the new pods get traffic (each
   new pod's first call is timed; the pods' counts are those after the scale-up).

Each act prints what the pods themselves counted; ``--json`` prints the benchmark's document
instead (one entry per act). A PNG chart of calls per pod over time (one panel per act) is
written when matplotlib is installed (the ``chart`` extra).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from grpc_balance_mw.affinity import AffinityRegistry, Transition
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.cli.bench import (
    SURGE_CAPACITY,
    SURGE_DEADLINE_S,
    SURGE_SERVICE_MS,
    Settings,
    burst,
    document,
)
from grpc_balance_mw.cli.chart import Timeline, write_chart
from grpc_balance_mw.cli.strategies import OWN_CONNECTION, Result
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import EVENT_STATE_CHANGE, AffinityTelemetry
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

PODS, SCALED_PODS = 3, 5
#: Act 4: calls before the scale-up, how long to watch after it at most, and how long to go on
#: once every new pod served (so that the counts show them carrying their share, not one call).
BEFORE_SCALE_S, SCALE_WATCH_S, AFTER_NEW_PODS_S = 1.5, 8.0, 2.0


class Demo:
    """The four acts on one cluster; ``out`` is None with ``--json`` (the tables are left out)."""

    def __init__(self, cluster: LocalCluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.out = None if args.json else sys.stdout
        self.results: list[Result] = []
        self.timelines: list[Timeline] = []
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def say(self, text: str = "") -> None:
        if self.out is not None:
            print(text, file=self.out)

    # -- act 1 ---------------------------------------------------------------------------------

    def pinned(self) -> Any:
        """Act 1; returns the observed plain channel (act 2 surges through it)."""
        args = self.args
        alarms: list[tuple[float, Transition]] = []
        started = time.monotonic()

        def on_alarm(transition: Transition) -> None:
            alarms.append((time.monotonic() - started, transition))

        telemetry = AffinityTelemetry(tracer_provider=self.provider, on_alarm=on_alarm)
        plain = grpc.insecure_channel(self.cluster.service_target, options=[OWN_CONNECTION])
        channel = observe(
            plain, ObserveOptions(expected_pods=PODS, telemetry=telemetry, registry=_registry())
        )
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        title = "1. omni -> ClusterIP Service, one plain channel (observed)"
        progress(f"act 1/4: {args.calls} calls at {args.rate:g}/s through one plain channel")
        self.say(f"\n== {title}")
        result, timeline = Result("pinned", "interceptors"), Timeline(title)
        self.cluster.reset_counts()
        started = time.monotonic()
        with _captured_warnings() as warnings:
            latencies = self._paced(stub, args.calls, args.rate, result, timeline)
            telemetry.flush(timeout=2.0)
        result.count(self.cluster.served())
        result.alarm = channel.detector.snapshot().state.value
        self._finish(result, timeline, latencies, PODS)
        for at, transition in alarms:
            snapshot = transition.snapshot
            timeline.marks.append((at, transition.current.value))
            self.say(
                f"   alarm:    {transition.previous.value} -> {transition.current.value} after "
                f"{snapshot.calls} judged calls ({snapshot.top_share:.0%} on {snapshot.top_pod}, "
                f"{snapshot.known_count} pods known)"
            )
        for warning in warnings:
            self.say(f"   log:      WARNING {warning}")
        span = _alarm_span(self.exporter.get_finished_spans())
        if span is not None:
            self.say("   the span of the call that raised it, as ConsoleSpanExporter prints it:")
            self.say(_indent(span.to_json(), "   "))
        return channel

    # -- acts 2 and 3 --------------------------------------------------------------------------

    def surge(self, number: int, channel: Any, strategy: str, title: str) -> None:
        progress(f"act {number}/4: a surge of {self.args.surge} concurrent calls ({strategy})")
        self.say(f"\n== {title}")
        result, timeline = Result("surge", strategy), Timeline(title)
        latencies: list[float] = []
        self.cluster.reset_counts()  # after any warm-up: only the surge's calls are counted
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        burst(stub, self.args.surge, result, latencies, timeline.calls)
        stats = self.cluster.stats()
        result.count({name: s.total_calls for name, s in stats.items()})
        result.alarm = channel.detector.snapshot().state.value
        in_flight = {name: s.max_in_flight for name, s in stats.items()}
        self._finish(result, timeline, latencies, PODS, in_flight)

    # -- act 4 ---------------------------------------------------------------------------------

    def scale_up(self, channel: Any) -> None:
        args = self.args
        title = f"4. the balanced channel while the Service scales {PODS} -> {SCALED_PODS} pods"
        progress(f"act 4/4: calls at {args.rate:g}/s, then {PODS} -> {SCALED_PODS} pods")
        self.say(f"\n== {title}")
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        result, timeline = Result("scale-up", "balanced"), Timeline(title)
        first = {pod.name for pod in self.cluster.pods}
        scaled: list[float] = []
        #: new pod -> seconds from the scale-up to its first call
        new_seen: dict[str, float] = {}

        def watch(at: float, pod: str | None) -> bool:
            """Keep calling? Until every new pod served and AFTER_NEW_PODS_S more, or the bound."""
            if not scaled:
                return True
            since = at - scaled[0]
            if pod is not None and pod not in first and pod not in new_seen:
                new_seen[pod] = round(since, 3)
                if result.seconds_to_new_pod_traffic is None:
                    result.seconds_to_new_pod_traffic = new_seen[pod]
            if len(new_seen) < SCALED_PODS - PODS:
                return since < SCALE_WATCH_S
            return since < min(max(new_seen.values()) + AFTER_NEW_PODS_S, SCALE_WATCH_S)

        def scale() -> None:
            self.cluster.scale(SCALED_PODS)
            scaled.append(time.monotonic() - started)
            self.cluster.reset_counts()  # the counts below are those after the scale-up
            timeline.marks.append((scaled[0], f"{SCALED_PODS} pods"))

        self.cluster.reset_counts()
        started = time.monotonic()
        timer = threading.Timer(BEFORE_SCALE_S, scale)
        timer.start()
        bound = int((BEFORE_SCALE_S + SCALE_WATCH_S + 5) * args.rate)
        try:
            latencies = self._paced(
                stub,
                bound,
                args.rate,
                result,
                timeline,
                keep_going=watch,
                until=BEFORE_SCALE_S + SCALE_WATCH_S + 5,
            )
        finally:
            timer.join()
        result.count(self.cluster.served())
        result.alarm = channel.detector.snapshot().state.value
        self.say("   calls each pod served after the scale-up:")
        self._finish(result, timeline, latencies, SCALED_PODS)
        for pod, seconds in sorted(new_seen.items()):
            self.say(f"   {pod} served its first call {seconds:.2f} s after the scale-up")
        if len(new_seen) < SCALED_PODS - PODS:
            self.say(
                f"   {SCALED_PODS - PODS - len(new_seen)} new pod(s) served no call within "
                f"{SCALE_WATCH_S:g} s"
            )

    # -- shared --------------------------------------------------------------------------------

    def _paced(
        self,
        stub: Any,
        calls: int,
        rate: float,
        result: Result,
        timeline: Timeline,
        *,
        keep_going: Callable[[float, str | None], bool] | None = None,
        until: float = 600.0,
    ) -> list[float]:
        """Up to ``calls`` calls at ``rate`` per second, for at most ``until`` seconds."""
        latencies: list[float] = []
        started = time.monotonic()
        next_report = started + 5.0
        for i in range(calls):
            now = time.monotonic()
            if now - started > until:
                break
            if now >= next_report:
                progress(f"  {i} calls")
                next_report += 5.0
            time.sleep(max(0.0, started + i / rate - now))
            began = time.perf_counter()
            pod: str | None = None
            try:
                response = stub.GetChargePoint(pb.GetChargePointRequest(id=f"cp-{i}"), timeout=5)
                pod = str(response.served_by)
                latencies.append((time.perf_counter() - began) * 1000)
            except grpc.RpcError as error:
                code = getattr(error, "code", None)
                result.failed(code() if callable(code) else None)
            result.calls += 1
            at = time.monotonic() - started
            timeline.calls.append((at, pod))
            if keep_going is not None and not keep_going(at, pod):
                break
        return latencies

    def _finish(
        self,
        result: Result,
        timeline: Timeline,
        latencies: list[float],
        pods: int,
        in_flight: dict[str, int] | None = None,
    ) -> None:
        result.finish(latencies, pods)
        timeline.pods = sorted(result.per_pod)  # idle pods too: the chart draws them at 0
        self.results.append(result)
        self.timelines.append(timeline)
        total = sum(result.per_pod.values()) or 1
        for pod, count in sorted(result.per_pod.items()):
            bar = "#" * round(40 * count / total)
            extra = ""
            if in_flight and in_flight.get(pod):
                extra = f"  (at most {in_flight[pod]} at once)"
            self.say(f"   {pod:18} {count:5d}  {bar}{extra}")
        errors = ", ".join(f"{n} {code}" for code, n in sorted(result.error_codes.items()))
        self.say(
            f"   {result.calls} calls, {result.errors} failed{f' ({errors})' if errors else ''}; "
            f"busiest pod {_ratio(result.max_share_over_fair)} its fair share; "
            f"p50 {_ms(result.p50_ms)}, p99 {_ms(result.p99_ms)}"
            + (f"; detector: {result.alarm}" if result.alarm else "")
        )


def _registry() -> AffinityRegistry:
    return AffinityRegistry()


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _alarm_span(spans: Any) -> ReadableSpan | None:
    """The first finished span that carries the alarm event (the state change to an alarm)."""
    for span in spans:
        for event in span.events:
            if event.name == EVENT_STATE_CHANGE and (event.attributes or {}).get(
                "grpc_balance_mw.affinity.state"
            ) in ("pinned", "skewed"):
                return span  # type: ignore[no-any-return]
    return None


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    """The package's warnings, printed in the act's section instead of on stderr."""
    logger = logging.getLogger("grpc_balance_mw")
    captured: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record.getMessage())

    handler = _Keep(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield captured
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def run(args: argparse.Namespace) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    missing = missing_components(service=args.l4)
    if missing:
        raise ConfigurationError("; ".join(missing))
    began = time.monotonic()
    progress(f"starting a {PODS}-pod local cluster (service={args.l4})")
    with LocalCluster(PODS, service=args.l4, dns=None, l7=None) as cluster:
        demo = Demo(cluster, args)
        demo.say(f"local cluster: {cluster!r}")
        plain = demo.pinned()
        for pod in cluster.pods:
            cluster.configure(
                pod.name, service_time_ms=SURGE_SERVICE_MS, max_concurrent=SURGE_CAPACITY
            )
        demo.say(
            f"\n(every pod now takes {SURGE_CAPACITY} calls at once, {SURGE_SERVICE_MS:g} ms each, "
            f"and queues the rest; omni's deadline is {SURGE_DEADLINE_S * 1000:g} ms)"
        )
        try:
            demo.surge(
                2,
                plain,
                "plain",
                f"2. a surge of {args.surge} concurrent calls through that channel",
            )
        finally:
            plain.close()
        balanced_telemetry = AffinityTelemetry(tracer_provider=demo.provider)
        with balanced_channel(
            cluster.service_target,
            observe=ObserveOptions(
                expected_pods=PODS, telemetry=balanced_telemetry, registry=_registry()
            ),
        ) as balanced:
            _settle(balanced, PODS)
            demo.surge(
                3,
                balanced,
                "balanced",
                "3. the same surge through the balanced channel",
            )
            for pod in cluster.pods:
                cluster.configure(pod.name, service_time_ms=0, max_concurrent=0)
            demo.scale_up(balanced)
    chart = Path(args.chart)
    why_not = write_chart(demo.timelines, chart)
    line = why_not or f"chart: calls per pod over time, one panel per act: {chart}"
    if args.json:
        json.dump(document(demo.results, Settings(l4=args.l4)), sys.stdout, indent=2)
        sys.stdout.write("\n")
        progress(line)
    else:
        print(f"\n{line}")
    progress(f"done in {time.monotonic() - began:.1f} s")
    return 0


def _settle(channel: Any, pods: int, timeout_s: float = 5.0) -> None:
    """Wait (bounded) until the balanced channel's lanes cover ``pods`` distinct pods."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        covered = {lane.pod for lane in channel.pool.lanes if lane.is_available()} - {None}
        if len(covered) >= pods:
            return
        time.sleep(0.05)
