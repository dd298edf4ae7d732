"""What observing costs the way applications run: many callers on one channel, and the detector
alone at 3 and 3,000 pods. Part of ``grpc-balance overhead``.

* 32 threads on one sync channel and 500 tasks on one ``grpc.aio`` channel (both adjustable),
  each variant measured in interleaved rounds as client CPU time per call (what the observation
  adds to the application's own process) and wall time per call: ``bare``, ``detection``
  (:func:`observe` without telemetry), ``detection+spans+metrics`` (an SDK tracer provider with a
  ``BatchSpanProcessor`` whose exporter drops the spans, and a meter provider with a reader), and
  ``otel-grpc`` (opentelemetry-instrumentation-grpc alone, on the same providers). Targets:
  detection within 3 % of bare; detection+spans+metrics no slower than otel-grpc.
* The detector's own cost per call, fed by a :class:`CallObserver` the way the adapters feed it,
  with calls spread over 3 pods and over 3,000: O(1) in the pod count, target within 1.2x.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from grpc_balance_mw.affinity import AffinityConfig, AffinityDetector, AffinityRegistry
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.aio.observed_channel import observe as observe_aio
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

#: Per variant and round: (client CPU us per call, wall us per call).
Figures = dict[str, list[tuple[float, float]]]
STEADY = AffinityConfig(warmup_s=0)
#: The detector bench knows every pod it is shown (``max_known_pods`` defaults to 256).
_MANY_PODS = AffinityConfig(warmup_s=0, max_known_pods=4096)
VARIANTS = ("bare", "detection", "detection+spans+metrics", "otel-grpc")
_REQUEST = pb.GetChargePointRequest(id="cp-1")


class _DropSpans(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Providers:
    """The application's SDK, as deployments run it: batched spans, metrics with a reader."""

    def __init__(self) -> None:
        self.tracer = TracerProvider()
        self.tracer.add_span_processor(BatchSpanProcessor(_DropSpans()))
        self.meter = MeterProvider(metric_readers=[InMemoryMetricReader()])

    def telemetry(self) -> AffinityTelemetry:
        return AffinityTelemetry(tracer_provider=self.tracer, meter_provider=self.meter)

    def options(self, telemetry: bool) -> ObserveOptions:
        return ObserveOptions(
            registry=AffinityRegistry(STEADY),
            expected_pods=3,
            telemetry=self.telemetry() if telemetry else None,
        )

    def shutdown(self) -> None:
        self.tracer.shutdown()
        self.meter.shutdown()


def _sync_variants(channel: grpc.Channel, providers: _Providers) -> dict[str, Any]:
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

    return {
        "bare": channel,
        "detection": observe(channel, providers.options(telemetry=False)),
        "detection+spans+metrics": observe(channel, providers.options(telemetry=True)),
        "otel-grpc": grpcext.intercept_channel(  # type: ignore[no-untyped-call]
            channel,
            client_interceptor(tracer_provider=providers.tracer),  # type: ignore[no-untyped-call]
        ),
    }


def _threads(channel: Any, threads: int, calls_each: int) -> tuple[float, float]:
    rpc = pb_grpc.ChargePointsStub(channel).GetChargePoint  # type: ignore[no-untyped-call]

    def work() -> None:
        for _ in range(calls_each):
            rpc(_REQUEST, timeout=10)

    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work) for _ in range(threads)]:
            done.result()
    calls = threads * calls_each
    return (time.process_time() - cpu) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6


async def _tasks(channel: Any, tasks: int, calls_each: int) -> tuple[float, float]:
    rpc = pb_grpc.ChargePointsStub(channel).GetChargePoint  # type: ignore[no-untyped-call]

    async def work() -> None:
        for _ in range(calls_each):
            await rpc(_REQUEST, timeout=10)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(work() for _ in range(tasks)))
    calls = tasks * calls_each
    return (time.process_time() - cpu) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6


def _rotated(names: list[str], index: int) -> list[str]:
    return names[index % len(names) :] + names[: index % len(names)]


def measure_threads(target: str, rounds: int, threads: int, calls_each: int) -> Figures:
    """``threads`` threads on one sync channel per variant, interleaved round by round."""
    providers = _Providers()
    figures: Figures = {name: [] for name in VARIANTS}
    try:
        with grpc.insecure_channel(target) as channel:
            variants = _sync_variants(channel, providers)
            for variant in variants.values():
                _threads(variant, min(threads, 4), 20)  # warm every path
            for index in range(rounds):
                progress(f"{threads} threads, round {index + 1}/{rounds}")
                for name in _rotated(list(variants), index):
                    figures[name].append(_threads(variants[name], threads, calls_each))
    finally:
        providers.shutdown()
    return figures


def measure_tasks(target: str, rounds: int, tasks: int, calls_each: int) -> Figures:
    """``tasks`` tasks on one aio channel per variant, interleaved round by round."""
    return asyncio.run(_measure_tasks(target, rounds, tasks, calls_each))


async def _measure_tasks(target: str, rounds: int, tasks: int, calls_each: int) -> Figures:
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    providers = _Providers()
    otel = aio_client_interceptors(tracer_provider=providers.tracer)  # type: ignore[no-untyped-call]
    channels: dict[str, Any] = {
        "bare": grpc.aio.insecure_channel(target),
        # target= given: an old grpcio's aio channel (1.50 measured) keeps no target to learn
        "detection": observe_aio(
            grpc.aio.insecure_channel(target), providers.options(telemetry=False), target=target
        ),
        "detection+spans+metrics": observe_aio(
            grpc.aio.insecure_channel(target), providers.options(telemetry=True), target=target
        ),
        "otel-grpc": grpc.aio.insecure_channel(target, interceptors=otel),
    }
    figures: Figures = {name: [] for name in VARIANTS}
    try:
        for channel in channels.values():
            await _tasks(channel, min(tasks, 20), 5)  # warm every path
        for index in range(rounds):
            progress(f"{tasks} aio tasks, round {index + 1}/{rounds}")
            for name in _rotated(list(channels), index):
                figures[name].append(await _tasks(channels[name], tasks, calls_each))
    finally:
        closing: list[Awaitable[None]] = [channel.close() for channel in channels.values()]
        await asyncio.gather(*closing)
        providers.shutdown()
    return figures


def report(title: str, figures: Figures) -> str:
    """Medians per variant against bare, then the two verdicts (on client CPU per call)."""
    cpu = {name: statistics.median(c for c, _ in rows) for name, rows in figures.items()}
    wall = {name: statistics.median(w for _, w in rows) for name, rows in figures.items()}
    lines = [title, f"{'variant':<26}{'cpu us/call':>12}{'vs bare':>9}{'wall us/call':>14}"]
    for name in figures:
        lines.append(
            f"{name:<26}{cpu[name]:>12.1f}{cpu[name] / cpu['bare']:>8.3f}x{wall[name]:>14.1f}"
        )
    detection = cpu["detection"] / cpu["bare"] - 1
    telemetry = cpu["detection+spans+metrics"] / cpu["otel-grpc"]
    lines.append(
        f"detection vs bare: {detection:+.1%} client CPU (target <= 3%) "
        f"{'met' if detection <= 0.03 else 'MISSED'}{_spread(figures, 'detection', 'bare', True)}"
    )
    lines.append(
        f"detection+spans+metrics vs otel-grpc: {telemetry:.3f}x client CPU (target <= 1.00x) "
        f"{'met' if telemetry <= 1.0 else 'MISSED'}"
        f"{_spread(figures, 'detection+spans+metrics', 'otel-grpc', False)}"
    )
    return "\n".join(lines)


def _spread(figures: Figures, variant: str, base: str, percent: bool) -> str:
    """The same comparison round by round (rounds ran back to back, so a wide range says the
    machine was noisy, not that the code varies)."""
    ratios = [c / b for (c, _), (b, _) in zip(figures[variant], figures[base], strict=False) if b]
    if len(ratios) < 2:
        return ""
    low, high = min(ratios), max(ratios)
    if percent:
        return f"; per round {low - 1:+.1%}..{high - 1:+.1%}"
    return f"; per round {low:.3f}x..{high:.3f}x"


def detector_cost(pods: int, calls: int = 60_000) -> float:
    """CPU microseconds per call that the detector takes with calls spread over ``pods``."""
    metadata = [((POD_HEADER, f"pod-{i}"),) for i in range(pods)]
    sequence = [metadata[i % pods] for i in range(calls)]
    detector = AffinityDetector("10.0.0.1:80", _MANY_PODS)
    detector.expected_pods = pods
    observer = CallObserver(detector)
    count: Callable[..., Any] = observer.count
    started = time.process_time()
    for headers in sequence:
        count(0.0, False, headers, None)
    _ = detector.state  # judge what is still queued
    return (time.process_time() - started) / calls * 1e6


def detector_report(repeats: int = 5) -> str:
    """The best of ``repeats`` at 3 and at 3,000 pods, alternated so drift hits both alike."""
    few, many = float("inf"), float("inf")
    for _ in range(repeats):
        few = min(few, detector_cost(3))
        many = min(many, detector_cost(3000))
    ratio = many / few
    return (
        f"detector per call: {few:.2f} us at 3 pods, {many:.2f} us at 3,000 pods: {ratio:.2f}x "
        f"(target <= 1.2x) {'met' if ratio <= 1.2 else 'MISSED'}"
    )
