"""``grpc-balance demo``: the problem and its fixes, on the embedded local cluster.

`omni` calls `charge-points` (3 pods) the way most clients do, through one channel to a ClusterIP
Service, then through a headless Service with ``round_robin``, then through an L7 proxy standing in
for Envoy. Each run shows what the pods themselves counted (the ground truth) next to what the
affinity interceptor concluded from the response headers, and the alarm it raised in tracing.
Finally a surge: pods with a small capacity, hit through one pinned channel and through the fix.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from grpc_balance_mw.affinity import AffinityRegistry, Transition
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.client import AffinityInterceptor
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import L7Kind, LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

ROUND_ROBIN = [
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
]


@dataclass
class Run:
    """What one scenario produced."""

    title: str
    served: dict[str, int]
    state: str
    top_share: float
    alarms: list[str] = field(default_factory=list)
    spans: int = 0
    spans_with_pod: int = 0
    codes: dict[str, int] = field(default_factory=dict)


def _tracing() -> tuple[object | None, Callable[[], list[dict[str, object]]]]:
    """An SDK tracer provider with an in-memory exporter, when the SDK is installed."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    except ImportError:
        return None, list
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, lambda: [dict(s.attributes or {}) for s in exporter.get_finished_spans()]


def run_scenario(
    cluster: LocalCluster,
    title: str,
    target: str,
    options: list[tuple[str, object]],
    calls: int,
    rate: float,
) -> Run:
    cluster.reset_counts()
    provider, finished_spans = _tracing()
    alarms: list[str] = []

    def on_alarm(transition: Transition) -> None:
        snapshot = transition.snapshot
        alarms.append(
            f"{transition.previous.value} -> {transition.current.value} after "
            f"{snapshot.calls} judged calls (top share {snapshot.top_share:.0%})"
        )

    telemetry = AffinityTelemetry(tracer_provider=provider, on_alarm=on_alarm)  # type: ignore[arg-type]
    interceptor = AffinityInterceptor(
        target,
        ObserveOptions(
            expected_pods=len(cluster.pods), telemetry=telemetry, registry=AffinityRegistry()
        ),
    )
    codes: dict[str, int] = {}
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ChargePointsStub(grpc.intercept_channel(channel, interceptor))  # type: ignore[no-untyped-call]
        start = time.monotonic()
        next_report = start + 5.0
        for i in range(calls):
            if time.monotonic() >= next_report:
                progress(f"  {i}/{calls} calls")
                next_report += 5.0
            time.sleep(max(0.0, start + i / rate - time.monotonic()))  # omni's steady request rate
            try:
                stub.GetChargePoint(pb.GetChargePointRequest(id=f"cp-{i}"), timeout=5)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            codes[code.name] = codes.get(code.name, 0) + 1
    snapshot = interceptor.detector.snapshot()
    spans = finished_spans()
    return Run(
        title=title,
        served=cluster.served(),
        state=snapshot.state.value,
        top_share=snapshot.top_share,
        alarms=alarms,
        spans=len(spans),
        spans_with_pod=sum(1 for s in spans if "grpc_balance_mw.pod" in s),
        codes=codes,
    )


def surge(
    cluster: LocalCluster, target: str, options: list[tuple[str, object]], calls: int
) -> dict[str, int]:
    """``calls`` concurrent calls on one channel; how many the pods refused (RESOURCE_EXHAUSTED)."""
    cluster.reset_counts()
    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        stub.GetChargePoint(pb.GetChargePointRequest(id="warm-up"), timeout=5, wait_for_ready=True)
        futures = [
            stub.GetChargePoint.future(pb.GetChargePointRequest(id=f"cp-{i}"), timeout=10)
            for i in range(calls)
        ]
        for future in futures:
            try:
                future.result()
                name = "OK"
            except grpc.RpcError as err:
                name = err.code().name
            outcomes[name] = outcomes.get(name, 0) + 1
    return outcomes


def print_run(run: Run) -> None:
    total = sum(run.served.values()) or 1
    for pod, count in sorted(run.served.items()):
        bar = "#" * round(40 * count / total)
        print(f"   {pod:18} {count:5d}  {bar}")
    print(f"   detector: {run.state} (top pod share {run.top_share:.0%})")
    for change in run.alarms:
        print(f"   state:    {change}")
    if run.spans:
        print(f"   tracing:  {run.spans} CLIENT spans, {run.spans_with_pod} tagged with the pod")
    if set(run.codes) != {"OK"}:
        print(f"   status codes: {run.codes}")


def run(args: argparse.Namespace) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # keep prints and the logged warning in order
    l7: L7Kind | None = "haproxy" if not missing_components(l7="haproxy") else None
    missing = missing_components(service=args.service)
    if missing:
        raise ConfigurationError("; ".join(missing))
    progress("starting a 3-pod local cluster")
    with LocalCluster(pods=3, service=args.service, dns="embedded", l7=l7) as cluster:
        print(f"local cluster: {cluster!r}")
        scenarios = [
            ("omni -> ClusterIP Service, one channel", cluster.service_target, []),
            ("fix: headless Service + dns:/// + round_robin", cluster.headless_target, ROUND_ROBIN),
        ]
        if l7 is not None:
            scenarios.append(("an L7 proxy in front (Envoy stand-in)", cluster.l7_target, []))
        else:
            progress("haproxy is not installed: the L7 scenario is left out")
        for number, (title, target, options) in enumerate(scenarios, 1):
            progress(
                f"scenario {number}/{len(scenarios)}: {args.calls} calls at {args.rate:g}/s "
                f"(about {args.calls / args.rate:.0f} s)"
            )
            print(f"\n== {title}")
            print_run(run_scenario(cluster, title, target, options, args.calls, args.rate))

    progress("the surge: starting 3 pods of capacity 8")
    print("\n== a surge: 60 concurrent calls of 50 ms, pods of capacity 8 that refuse the rest")
    with LocalCluster(
        pods=3,
        service=args.service,
        dns="embedded",
        service_time_ms=50,
        max_concurrent=8,
        overflow="reject",
    ) as cluster:
        for title, target, options in (
            ("one channel through the Service", cluster.service_target, []),
            ("headless + round_robin", cluster.headless_target, ROUND_ROBIN),
        ):
            outcomes = surge(cluster, target, options, calls=60)
            print(f"   {title:34} {outcomes}")
            print(f"   {'':34} calls received per pod: {cluster.served()}")
    return 0
