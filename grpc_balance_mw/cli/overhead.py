"""What observing costs: warm unary latency, bare vs detection vs spans vs the OTel interceptor.

``grpc-balance overhead [--rounds 10] [--calls 500]``

One sync pod runs in a separate process (so the server does not share the client's GIL); the
client makes warm unary calls over one connection through eight channel variants, every variant
in turn in a new shuffled order for each call, so drift in the machine's speed hits them all
alike:

* ``bare``: the plain channel;
* ``bare-again``: the same plain channel measured as a variant of its own, the control: how far
  two identical variants differ in this run is the noise floor, and a difference smaller than
  it cannot be told from noise;
* ``noop-interceptor``: ``grpc.intercept_channel`` with an interceptor that does nothing, to
  tell grpcio's own interceptor machinery from what the observation adds on top of it;
* ``detection``: :func:`affinity_interceptors` without telemetry;
* ``detection-channel``: the same observation through :func:`observe`, a channel wrapper
  that skips grpcio's interceptor machinery;
* ``detection+spans``: :func:`affinity_interceptors` with :class:`AffinityTelemetry` making a
  CLIENT span per call;
* ``detection+spans-channel``: the same through :func:`observe`;
* ``otel-grpc``: opentelemetry-instrumentation-grpc's client interceptor alone.

Both span variants use the same SDK tracer provider with a span processor that drops the spans,
so what is measured is making the spans, not exporting them. Targets: detection adds at most 3 %
to the median (through the interceptor, also judged against the no-op interceptor: what it adds
to a channel that is intercepted anyway, since grpcio's ``intercept_channel`` costs what it costs
whatever the interceptor, and the lines against bare say how much that is); detection+spans
costs no more than otel-grpc (through the interceptor, also judged by what each adds to the
channel it works on: ours over the no-op interceptor, otel-grpc, whose own channel wrapper is
lighter than grpcio's, over bare). The
table ends with one verdict line per target and way of observing, judged on the median of the
per-round ratios (a round's variants take turns call by call, so pairing them by round cancels
the machine's drift between rounds), and the noise floor.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.interceptors import affinity_interceptors
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.server import PodIdentityInterceptor
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import ClusterError
from grpc_balance_mw.testing.charge_points.servicer import SyncChargePointsServicer
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

Call = Callable[[], object]
#: The variants that go through ``grpc.intercept_channel``.
_INTERCEPTED = ("detection", "detection+spans")
#: (variant, baseline, target on the ratio of medians, how the ratio is shown)
TARGETS = (
    ("detection", "bare", 1.03, "percent"),
    # What detection adds on a channel that is intercepted anyway (grpcio's machinery apart).
    ("detection", "noop-interceptor", 1.03, "percent"),
    ("detection-channel", "bare", 1.03, "percent"),
    ("detection+spans", "otel-grpc", 1.00, "ratio"),
    ("detection+spans-channel", "otel-grpc", 1.00, "ratio"),
)


class _Noop(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


class _DropSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def serve() -> None:
    """The pod process: a sync server with the identity middleware; prints ``READY <port>``."""
    identity = PodIdentity(name="bench-pod-0", ip="127.0.0.1", namespace="bench")
    server = grpc.server(ThreadPoolExecutor(4), interceptors=[PodIdentityInterceptor(identity)])
    servicer = SyncChargePointsServicer(identity.name)
    pb_grpc.add_ChargePointsServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        print(f"READY {port}", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
    finally:  # Ctrl-C too: end the calls in flight at once, not at their callers' deadline
        server.stop(None)


#: Measure the steady state: every call judged from the first (no warm-up).
STEADY = AffinityConfig(warmup_s=0)


def _variants(channel: grpc.Channel, target: str) -> dict[str, Call]:
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_DropSpans()))
    request = pb.GetChargePointRequest(id="cp-1")

    def detection(telemetry: AffinityTelemetry | None = None) -> grpc.Channel:
        options = ObserveOptions(
            registry=AffinityRegistry(STEADY), expected_pods=3, telemetry=telemetry
        )
        return grpc.intercept_channel(channel, *affinity_interceptors(target, options))

    def observed(telemetry: AffinityTelemetry | None = None) -> grpc.Channel:
        options = ObserveOptions(
            registry=AffinityRegistry(STEADY), expected_pods=3, telemetry=telemetry
        )
        return observe(channel, options)

    def spans() -> AffinityTelemetry:
        return AffinityTelemetry(tracer_provider=provider, metrics=False)

    channels: dict[str, Any] = {
        "bare": channel,
        "bare-again": channel,
        "noop-interceptor": grpc.intercept_channel(channel, _Noop()),
        "detection": detection(),
        "detection-channel": observed(),
        "detection+spans": detection(telemetry=spans()),
        "detection+spans-channel": observed(telemetry=spans()),
        "otel-grpc": grpcext.intercept_channel(  # type: ignore[no-untyped-call]
            channel,
            client_interceptor(tracer_provider=provider),  # type: ignore[no-untyped-call]
        ),
    }
    return {name: _unary_call(ch, request) for name, ch in channels.items()}


def _unary_call(channel: Any, request: pb.GetChargePointRequest) -> Call:
    rpc = pb_grpc.ChargePointsStub(channel).GetChargePoint  # type: ignore[no-untyped-call]
    return lambda: rpc(request, timeout=10)


def _percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def measure(target: str, rounds: int, calls: int, warmup: int) -> dict[str, list[float]]:
    """Latencies in microseconds per variant, ``calls`` per variant and round, the variants
    taking turns call by call (progress on stderr)."""
    with grpc.insecure_channel(target) as channel:
        variants = _variants(channel, target)
        for call in variants.values():
            for _ in range(warmup):
                call()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        clock = time.perf_counter_ns
        for round_index in range(rounds):
            progress(f"round {round_index + 1}/{rounds}")
            # Every variant in turn, in a new order each time: a round's variants meet the
            # same moments of the machine (run back to back in blocks of calls, two runs of
            # the same channel came out up to 3.5 % apart), and none always follows another.
            names, shuffle = list(variants), random.Random(round_index).shuffle
            latencies: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(calls):
                shuffle(names)
                for name in names:
                    call = variants[name]
                    started = clock()
                    call()
                    latencies[name].append((clock() - started) / 1000)
            for name, values in latencies.items():
                samples[name].extend(values)
    return samples


def _round_ratios(
    values: list[float], baseline: list[float], calls: int, ordered: bool = True
) -> list[float]:
    """The ratio of medians in each round (the variants took turns within a round), sorted
    unless ``ordered`` is False (then in round order, to pair with another variant's)."""
    ratios = [
        statistics.median(values[i : i + calls]) / statistics.median(baseline[i : i + calls])
        for i in range(0, min(len(values), len(baseline)), calls)
    ]
    return sorted(ratios) if ordered else ratios


def _judged(per_round: list[float], limit: float, shown: str) -> str:
    """A verdict on sorted per-round ratios: their median against ``limit``, then their middle
    half (how much one run's verdict can be trusted), as percent or as a ratio."""
    ratio = statistics.median(per_round)
    low, high = _percentile(per_round, 0.25), _percentile(per_round, 0.75)
    if shown == "percent":
        figures = f"{(ratio - 1) * 100:+.1f}% (target <= {(limit - 1) * 100:.0f}%)"
        spread = f"{(low - 1) * 100:+.1f}%..{(high - 1) * 100:+.1f}%"
    else:
        figures = f"{ratio:.3f}x (target <= {limit:.2f}x)"
        spread = f"{low:.3f}x..{high:.3f}x"
    return f"{figures} {'met' if ratio <= limit else 'MISSED'}; per round {spread}"


def _added_verdict(samples: dict[str, list[float]], calls: int) -> list[str]:
    """What each way of making spans adds to the channel it works on, side by side: the
    interceptor over grpcio's no-op interceptor (the machinery every ``intercept_channel``
    user pays, whatever the interceptor), otel-grpc over bare (its own channel wrapper
    included), judged on the median of the per-round ratios of the two."""
    needed = ("detection+spans", "noop-interceptor", "otel-grpc", "bare")
    if not all(name in samples for name in needed):
        return []
    ours = _round_ratios(samples["detection+spans"], samples["noop-interceptor"], calls, False)
    theirs = _round_ratios(samples["otel-grpc"], samples["bare"], calls, False)
    per_round = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    return [
        "detection+spans over noop-interceptor vs otel-grpc over bare: "
        f"{_judged(per_round, 1.0, 'ratio')} (what each adds to the channel it works on)"
    ]


def verdicts(samples: dict[str, list[float]], calls: int) -> list[str]:
    """One line per target (see :func:`_judged`), the interceptor's against bare with what
    grpcio's machinery costs alone; what spans add, ours and otel-grpc's; then the noise
    floor, ``bare-again`` against ``bare`` the same way."""
    machinery = ""
    if "noop-interceptor" in samples and "bare" in samples:
        alone = _round_ratios(samples["noop-interceptor"], samples["bare"], calls)
        machinery = (
            f" (grpcio's intercept_channel alone: {(statistics.median(alone) - 1) * 100:+.1f}%"
            " of bare)"
        )
    lines = []
    for name, baseline, limit, shown in TARGETS:
        if name not in samples or baseline not in samples:
            continue
        per_round = _round_ratios(samples[name], samples[baseline], calls)
        why = machinery if name in _INTERCEPTED and baseline != "noop-interceptor" else ""
        lines.append(f"{name} vs {baseline}: {_judged(per_round, limit, shown)}{why}")
    lines.extend(_added_verdict(samples, calls))
    if "bare-again" in samples and "bare" in samples:
        per_round = _round_ratios(samples["bare-again"], samples["bare"], calls)
        floor = statistics.median(per_round)
        low, high = _percentile(per_round, 0.25), _percentile(per_round, 0.75)
        lines.append(
            f"noise floor, bare-again vs bare (the same channel): {(floor - 1) * 100:+.1f}%; "
            f"per round {(low - 1) * 100:+.1f}%..{(high - 1) * 100:+.1f}%"
        )
    return lines


def report(samples: dict[str, list[float]], calls: int) -> str:
    """The table of medians and p99s against ``bare``, then the verdicts."""
    bare = statistics.median(samples["bare"])
    bare_p99 = _percentile(sorted(samples["bare"]), 0.99)
    width = max(len(name) for name in samples) + 2
    lines = [
        f"{'variant':<{width}}{'calls':>7}{'median us':>11}{'p99 us':>10}{'median':>9}{'p99':>8}"
    ]
    for name, values in samples.items():
        ordered = sorted(values)
        median, p99 = statistics.median(ordered), _percentile(ordered, 0.99)
        lines.append(
            f"{name:<{width}}{len(ordered):>7}{median:>11.1f}{p99:>10.1f}"
            f"{median / bare:>8.3f}x{p99 / bare_p99:>7.3f}x"
        )
    return "\n".join([*lines, "", *verdicts(samples, calls)])


def run(args: argparse.Namespace) -> int:
    if getattr(args, "balanced", False):
        from grpc_balance_mw.cli import overhead_balanced

        return overhead_balanced.run(args)
    # the bench pod is one pod of "3": the pinned warning would be right, and noise here
    logging.getLogger("grpc_balance_mw").setLevel(logging.ERROR)
    # The detector alone, first: before any gRPC runs in this process (the threads an aio run
    # leaves behind made its 3,000-pod case 5 % slower, and the 3-pod case not at all).
    from grpc_balance_mw.cli import overhead_load

    progress("the detector alone, at 3 and 3,000 pods")
    detector = overhead_load.detector_report()
    progress("starting the pod process")
    with subprocess.Popen(
        [sys.executable, "-m", "grpc_balance_mw.cli.overhead"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as pod:
        try:
            assert pod.stdout is not None
            line = pod.stdout.readline().split()
            if line[:1] != ["READY"]:
                raise ClusterError(f"the pod process did not start: {line}")
            target = f"127.0.0.1:{line[1]}"
            started = time.monotonic()
            samples = measure(target, args.rounds, args.calls, args.warmup)
            took = time.monotonic() - started
            print(
                f"warm unary calls to {target}, {args.rounds} rounds x {args.calls} calls, "
                f"{took:.1f} s"
            )
            print(report(samples, args.calls))
            _load(target, args, detector)
        finally:
            if pod.stdin is not None:
                pod.stdin.close()  # the pod stops when its stdin closes
            try:
                pod.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pod.kill()
    return 0


def _load(target: str, args: argparse.Namespace, detector: str) -> None:
    """Many callers on one channel, and the detector alone (see ``overhead_load``)."""
    from grpc_balance_mw.cli import overhead_load

    # As many rounds as for one caller: on a shared host one round of 32 threads or 500 tasks
    # lands 10-40 % from its pair, and the verdict is a median of those pairs.
    rounds = max(2, args.rounds)
    threads_call_cpu = None
    if args.threads:
        figures = overhead_load.measure_threads(target, rounds, args.threads, 40)
        threads_call_cpu = statistics.median(cpu for cpu, _ in figures["bare"])
        print()
        print(overhead_load.report(f"{args.threads} threads on one sync channel", figures))
        figures = overhead_load.measure_threads_interleaved(target, rounds, args.threads, 10)
        print()
        print(
            overhead_load.report(
                f"{args.threads} threads on one sync channel, every variant in turn on each "
                "thread (each call timed by its thread's CPU clock)",
                figures,
                cpu_of="callers' CPU",
                wall_is="latency us",
            )
        )
    tasks_call_cpu = None
    if args.aio_tasks:
        figures = overhead_load.measure_tasks(target, rounds, args.aio_tasks, 4)
        tasks_call_cpu = statistics.median(cpu for cpu, _ in figures["bare"])
        print()
        print(overhead_load.report(f"{args.aio_tasks} tasks on one aio channel", figures))
    print()
    print(
        overhead_load.own_work_report(
            target, args.threads, threads_call_cpu, args.aio_tasks, tasks_call_cpu
        )
    )
    print(detector)


if __name__ == "__main__":
    # The pod process of `run`, not a command of its own.
    try:
        serve()
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: stop quietly
        sys.exit(130)
