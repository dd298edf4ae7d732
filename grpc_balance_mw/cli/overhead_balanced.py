"""What the balanced channel costs its client: ``grpc-balance overhead --balanced``.

Three pods run as processes of their own on loopback behind an L4 Service (HAProxy ``mode tcp``
when installed, else the harness's userspace proxy, also a process of its own), so the client's
own CPU is all that is timed: ``time.process_time()`` of this process, every thread included
(grpcio's own threads, the balanced channel's maintenance thread or task). The variants:

* ``plain``: one ``grpc`` channel to the Service (every call on one pod);
* ``plain-again``: the same channel measured as a variant of its own, the control: how far it
  lands from ``plain`` is the noise of the run;
* ``native-rr``: grpcio's own ``round_robin`` over the pods' addresses
  (``ipv4:ip1:port,ip2:port,...``), the floor for balancing per call: C-core picks;
* ``balanced``: :func:`~grpc_balance_mw.balanced_channel` to the Service (observing its lanes,
  the default);
* ``balanced-unobserved``: the same with ``observe=False``, to tell observing from routing;
* ``balanced+spans``: the balanced channel making a CLIENT span per call, against
* ``plain+otel``: the plain channel with opentelemetry-instrumentation-grpc's client interceptor,
  and ``native-rr+otel``: native round_robin with it (balancing over several connections costs
  a caller more than a pinned channel does, whoever picks; all span variants share one SDK
  tracer provider whose exporter drops the spans).

Workloads: one caller making unary calls back to back; ``--threads`` threads on one channel;
``--aio-tasks`` tasks on one ``grpc.aio`` channel (the aio forms of the same variants); a server
stream read to its end (per message). Each workload runs ``--rounds`` rounds; in each round every
variant makes its block of calls once, in an order that changes from round to round, and each
variant's CPU per call is divided by its baseline's *in the same round*: the table gives the
median of those per-round ratios and their quartiles (the machine's drift between rounds cancels;
the spread says how far one round can be trusted). Latency percentiles come from every call's
wall time (one caller and threads). Last, idle CPU: channels of each kind opened, used once,
left idle, the process's CPU per second per channel (what a process with nothing open burns in
the same window subtracted).

The channels of one workload stay open while its other variants run, so the balanced channels'
background work (scouts, health checks) is charged to every variant of that workload alike; the
idle figure gives it apart.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.cli.overhead_load import _DropSpans
from grpc_balance_mw.cli.overhead_load import _rotated as _order
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing import ClusterError, LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

__all__ = ["COMPARISONS", "VARIANTS", "Settings", "Workload", "measure", "report", "run"]

VARIANTS = (
    "plain",
    "plain-again",
    "native-rr",
    "balanced",
    "balanced-unobserved",
    "balanced+spans",
    "plain+otel",
    "native-rr+otel",
)
#: (variant, baseline): the ratios the table shows, in its column order.
COMPARISONS = (
    ("balanced", "native-rr"),
    ("balanced-unobserved", "native-rr"),
    ("balanced+spans", "plain+otel"),
    ("balanced+spans", "native-rr+otel"),
    ("native-rr", "plain"),
    ("plain-again", "plain"),
)
#: The kinds of channel whose idle CPU is measured (``nothing``: no channel, the baseline).
IDLE_KINDS = ("nothing", "plain", "native-rr", "balanced", "aio balanced")
_PODS = 3
_REQUEST = pb.GetChargePointRequest(id="cp-1")
_READY_S = 15.0


@dataclass(frozen=True)
class Settings:
    """How much to measure (``quick``: a few rounds of small blocks, for tests)."""

    rounds: int = 15
    calls: int = 200
    threads: int = 32
    thread_calls: int = 20
    tasks: int = 500
    task_calls: int = 4
    streams: int = 10
    messages: int = 100
    idle_channels: int = 4
    idle_s: float = 5.0
    idle_settle_s: float = 3.0
    idle_rounds: int = 2

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            rounds=2, calls=20, threads=4, thread_calls=3, tasks=20, task_calls=2,
            streams=2, messages=10, idle_channels=1, idle_s=0.3, idle_settle_s=0.2,
            idle_rounds=1,
        )  # fmt: skip


@dataclass
class Workload:
    """One workload's figures: per variant, client CPU us per unit in each round, the number
    of units made, and every call's latency in us (empty where not timed per call)."""

    name: str
    unit: str
    cpu: dict[str, list[float]] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)
    latency: dict[str, list[float]] = field(default_factory=dict)

    def add(self, variant: str, cpu_s: float, units: int, latency: Sequence[float] = ()) -> None:
        self.cpu.setdefault(variant, []).append(cpu_s / units * 1e6)
        self.units[variant] = self.units.get(variant, 0) + units
        self.latency.setdefault(variant, []).extend(latency)

    def ratios(self, variant: str, baseline: str) -> list[float]:
        """``variant``'s CPU per unit over ``baseline``'s, round by round."""
        pairs = zip(self.cpu.get(variant, ()), self.cpu.get(baseline, ()), strict=False)
        return [value / base for value, base in pairs if base > 0]


def _native_target(cluster: LocalCluster) -> str:
    return "ipv4:" + ",".join(pod.address for pod in cluster.pods)


_NATIVE_OPTIONS = (("grpc.lb_policy_name", "round_robin"),)


def _reached(pool: LanePool) -> bool:
    """Whether the channel's lanes take calls on every pod."""
    return len({lane.pod for lane in pool.lanes if lane.is_available()}) >= _PODS


def _not_reached(pool: LanePool) -> ClusterError:
    return ClusterError(
        f"the balanced channel reached no {_PODS} pods in {_READY_S:.0f} s: {pool!r}"
    )


def _wait_lanes(pool: LanePool) -> None:
    """Until the channel's lanes reach every pod (bounded)."""
    deadline = time.monotonic() + _READY_S
    while not _reached(pool):
        if time.monotonic() > deadline:
            raise _not_reached(pool)
        time.sleep(0.02)


async def _await_lanes(pool: LanePool) -> None:
    deadline = time.monotonic() + _READY_S
    while not _reached(pool):
        if time.monotonic() > deadline:
            raise _not_reached(pool)
        await asyncio.sleep(0.02)


@contextmanager
def _sync_channels(cluster: LocalCluster, tracer: TracerProvider) -> Iterator[dict[str, Any]]:
    """Every sync variant's channel, lanes ready; all closed on exit."""
    from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

    service = cluster.service_target
    with ExitStack() as stack:
        plain = stack.enter_context(grpc.insecure_channel(service))
        native = stack.enter_context(
            grpc.insecure_channel(_native_target(cluster), _NATIVE_OPTIONS)
        )
        spans = AffinityTelemetry(tracer_provider=tracer, metrics=False)
        balanced: dict[str, ObserveOptions | bool] = {
            "balanced": ObserveOptions(expected_pods=_PODS),
            "balanced-unobserved": False,
            "balanced+spans": ObserveOptions(expected_pods=_PODS, telemetry=spans),
        }
        channels: dict[str, Any] = {
            "plain": plain,
            "plain-again": plain,
            "native-rr": native,
            "plain+otel": grpcext.intercept_channel(  # type: ignore[no-untyped-call]
                plain,
                client_interceptor(tracer_provider=tracer),  # type: ignore[no-untyped-call]
            ),
            "native-rr+otel": grpcext.intercept_channel(  # type: ignore[no-untyped-call]
                native,
                client_interceptor(tracer_provider=tracer),  # type: ignore[no-untyped-call]
            ),
        }
        for name, observe in balanced.items():
            channel = stack.enter_context(balanced_channel(service, observe=observe))
            _wait_lanes(channel.pool)
            channels[name] = channel
        yield {name: channels[name] for name in VARIANTS}


def _unary(channel: Any) -> Callable[..., Any]:
    return pb_grpc.ChargePointsStub(channel).GetChargePoint  # type: ignore[no-untyped-call,no-any-return]


def _one_caller(rpc: Callable[..., Any], calls: int) -> tuple[float, list[float]]:
    gc.collect()
    latencies = []
    clock = time.perf_counter_ns
    cpu = time.process_time()
    for _ in range(calls):
        started = clock()
        rpc(_REQUEST, timeout=10)
        latencies.append((clock() - started) / 1000)
    return time.process_time() - cpu, latencies


def _threads(
    pool: ThreadPoolExecutor, rpc: Callable[..., Any], threads: int, calls: int
) -> tuple[float, list[float]]:
    def work() -> list[float]:
        clock = time.perf_counter_ns
        latencies = []
        for _ in range(calls):
            started = clock()
            rpc(_REQUEST, timeout=10)
            latencies.append((clock() - started) / 1000)
        return latencies

    gc.collect()
    cpu = time.process_time()
    done = [pool.submit(work) for _ in range(threads)]
    latencies = [value for future in done for value in future.result()]
    return time.process_time() - cpu, latencies


def _streams(channel: Any, streams: int, messages: int) -> tuple[float, int]:
    rpc = pb_grpc.ChargePointsStub(channel).WatchStatus  # type: ignore[no-untyped-call]
    request = pb.WatchStatusRequest(id="cp-1", updates=messages, interval_ms=0)
    gc.collect()
    cpu, read = time.process_time(), 0
    for _ in range(streams):
        for _message in rpc(request, timeout=30):
            read += 1
    return time.process_time() - cpu, read


def measure_sync(cluster: LocalCluster, settings: Settings) -> list[Workload]:
    """One caller, threads and streaming, every variant in each round (see the module doc)."""
    tracer = TracerProvider()
    tracer.add_span_processor(BatchSpanProcessor(_DropSpans()))
    one = Workload("one caller", "call")
    many = Workload(f"{settings.threads} threads", "call")
    stream = Workload("server streaming", "message")
    try:
        with (
            _sync_channels(cluster, tracer) as channels,
            ThreadPoolExecutor(settings.threads) as pool,
        ):
            rpcs = {name: _unary(channel) for name, channel in channels.items()}
            for name, rpc in rpcs.items():  # warm every path and every thread
                _one_caller(rpc, 20)
                _threads(pool, rpc, settings.threads, 2)
                _streams(channels[name], 1, 5)
            names = list(channels)
            for index in range(settings.rounds):
                progress(f"sync workloads, round {index + 1}/{settings.rounds}")
                for name in _order(names, index):
                    cpu, latencies = _one_caller(rpcs[name], settings.calls)
                    one.add(name, cpu + _flushed(tracer), settings.calls, latencies)
                for name in _order(names, index + 1):
                    cpu, latencies = _threads(
                        pool, rpcs[name], settings.threads, settings.thread_calls
                    )
                    many.add(name, cpu + _flushed(tracer), len(latencies), latencies)
                for name in _order(names, index + 2):
                    cpu, read = _streams(channels[name], settings.streams, settings.messages)
                    stream.add(name, cpu + _flushed(tracer), read)
    finally:
        tracer.shutdown()
    return [one, many, stream]


def _flushed(tracer: TracerProvider) -> float:
    """Export the spans still batched, as CPU of the variant that made them."""
    cpu = time.process_time()
    tracer.force_flush()
    return time.process_time() - cpu


def measure_aio(cluster: LocalCluster, settings: Settings) -> Workload:
    """``tasks`` tasks on one aio channel per variant, every variant in each round."""
    return asyncio.run(_measure_aio(cluster, settings))


async def _measure_aio(cluster: LocalCluster, settings: Settings) -> Workload:
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    tracer = TracerProvider()
    tracer.add_span_processor(BatchSpanProcessor(_DropSpans()))
    service = cluster.service_target
    otel = aio_client_interceptors(tracer_provider=tracer)  # type: ignore[no-untyped-call]
    plain = grpc.aio.insecure_channel(service)
    spans = AffinityTelemetry(tracer_provider=tracer, metrics=False)
    channels: dict[str, Any] = {
        "plain": plain,
        "plain-again": plain,
        "native-rr": grpc.aio.insecure_channel(_native_target(cluster), _NATIVE_OPTIONS),
        "balanced": balance_aio.balanced_channel(
            service, observe=ObserveOptions(expected_pods=_PODS)
        ),
        "balanced-unobserved": balance_aio.balanced_channel(service, observe=False),
        "balanced+spans": balance_aio.balanced_channel(
            service, observe=ObserveOptions(expected_pods=_PODS, telemetry=spans)
        ),
        "plain+otel": grpc.aio.insecure_channel(service, interceptors=otel),
        "native-rr+otel": grpc.aio.insecure_channel(
            _native_target(cluster), _NATIVE_OPTIONS, interceptors=otel
        ),
    }
    workload = Workload(f"{settings.tasks} aio tasks", "call")
    try:
        for channel in channels.values():
            if isinstance(channel, balance_aio.BalancedChannel):
                await _await_lanes(channel.pool)
        rpcs = {name: _unary(channel) for name, channel in channels.items()}
        for rpc in rpcs.values():
            await _tasks(rpc, min(settings.tasks, 50), 2)
        for index in range(settings.rounds):
            progress(f"{settings.tasks} aio tasks, round {index + 1}/{settings.rounds}")
            for name in _order(list(rpcs), index):
                cpu = await _tasks(rpcs[name], settings.tasks, settings.task_calls)
                workload.add(name, cpu + _flushed(tracer), settings.tasks * settings.task_calls)
    finally:
        unique = {id(channel): channel for channel in channels.values()}.values()
        closing: list[Awaitable[None]] = [channel.close() for channel in unique]
        await asyncio.gather(*closing)
        tracer.shutdown()
    return workload


async def _tasks(rpc: Callable[..., Any], tasks: int, calls: int) -> float:
    async def work() -> None:
        for _ in range(calls):
            await rpc(_REQUEST, timeout=10)

    gc.collect()
    cpu = time.process_time()
    await asyncio.gather(*(work() for _ in range(tasks)))
    return time.process_time() - cpu


def measure_idle(cluster: LocalCluster, settings: Settings) -> dict[str, list[float]]:
    """Milliseconds of client CPU per second per idle channel, per kind and round: channels
    opened, one call each (lanes ready), left to settle, then the idle window timed; what the
    process burns with no channel open in the same way is subtracted."""
    spent: dict[str, list[float]] = {kind: [] for kind in IDLE_KINDS}
    for index in range(settings.idle_rounds):
        for kind in _order(list(IDLE_KINDS), index):
            progress(f"idle {kind}, round {index + 1}/{settings.idle_rounds}")
            if kind == "aio balanced":
                cpu = asyncio.run(_idle_aio(cluster, settings))
            else:
                cpu = _idle_sync(cluster, settings, kind)
            spent[kind].append(cpu / settings.idle_s * 1000)
    nothing = spent.pop("nothing")
    count = settings.idle_channels
    return {
        kind: [(value - base) / count for value, base in zip(values, nothing, strict=True)]
        for kind, values in spent.items()
    }


def _idle_sync(cluster: LocalCluster, settings: Settings, kind: str) -> float:
    with ExitStack() as stack:
        for _ in range(settings.idle_channels if kind != "nothing" else 0):
            if kind == "balanced":
                channel: Any = stack.enter_context(
                    balanced_channel(
                        cluster.service_target, observe=ObserveOptions(expected_pods=_PODS)
                    )
                )
                _wait_lanes(channel.pool)
            elif kind == "native-rr":
                channel = stack.enter_context(
                    grpc.insecure_channel(_native_target(cluster), _NATIVE_OPTIONS)
                )
            else:
                channel = stack.enter_context(grpc.insecure_channel(cluster.service_target))
            _unary(channel)(_REQUEST, timeout=10)
        time.sleep(settings.idle_settle_s)
        cpu = time.process_time()
        time.sleep(settings.idle_s)
        return time.process_time() - cpu


async def _idle_aio(cluster: LocalCluster, settings: Settings) -> float:
    channels = [
        balance_aio.balanced_channel(
            cluster.service_target, observe=ObserveOptions(expected_pods=_PODS)
        )
        for _ in range(settings.idle_channels)
    ]
    try:
        for channel in channels:
            await _await_lanes(channel.pool)
            await _unary(channel)(_REQUEST, timeout=10)
        await asyncio.sleep(settings.idle_settle_s)
        cpu = time.process_time()
        await asyncio.sleep(settings.idle_s)
        return time.process_time() - cpu
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


@dataclass
class Results:
    workloads: list[Workload]
    idle: dict[str, list[float]]
    settings: Settings
    service: str
    loadavg: str = ""


def measure(settings: Settings, service: str = "auto") -> Results:
    """Start the pods and the Service, measure every workload, stop them."""
    kind = service if service != "auto" else ("haproxy" if shutil.which("haproxy") else "userspace")
    progress(f"starting {_PODS} pods behind a {kind} Service")
    with LocalCluster(_PODS, service=kind, dns=None) as cluster:  # type: ignore[arg-type]
        workloads = measure_sync(cluster, settings)
        workloads.insert(2, measure_aio(cluster, settings))
        idle = measure_idle(cluster, settings)
    return Results(workloads, idle, settings, kind, _loadavg())


def _loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as file:
            return " ".join(file.read().split()[:3])
    except OSError:
        return ""


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if len(ordered) < 2:
        value = ordered[0] if ordered else float("nan")
        return value, value, value
    low, _, high = statistics.quantiles(ordered, n=4, method="inclusive")
    return low, statistics.median(ordered), high


def to_json(results: Results) -> dict[str, Any]:
    """The figures as one JSON document (per-round values included)."""
    workloads = {}
    for workload in results.workloads:
        variants = {}
        for name in sorted(workload.cpu, key=_rank):
            latency = sorted(workload.latency.get(name, []))
            variants[name] = {
                "cpu_us_per_unit": statistics.median(workload.cpu[name]),
                "rounds": workload.cpu[name],
                "units": workload.units[name],
                "p50_us": _at(latency, 0.50),
                "p99_us": _at(latency, 0.99),
            }
        ratios = {}
        for variant, baseline in COMPARISONS:
            per_round = workload.ratios(variant, baseline)
            low, median, high = _quartiles(per_round)
            ratios[f"{variant}/{baseline}"] = {
                "median": median, "q1": low, "q3": high, "rounds": per_round
            }  # fmt: skip
        workloads[workload.name] = {"unit": workload.unit, "variants": variants, "ratios": ratios}
    idle = {
        kind: {"ms_per_s_per_channel": statistics.median(values), "rounds": values}
        for kind, values in results.idle.items()
    }
    return {
        "service": results.service,
        "pods": _PODS,
        "loadavg": results.loadavg,
        "cpus": os.cpu_count(),
        "rounds": results.settings.rounds,
        "workloads": workloads,
        "idle": idle,
    }


def _rank(variant: str) -> int:
    return VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)


def _at(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(results: Results) -> str:
    """The ratio table (median [quartiles] of per-round ratios), each workload's figures per
    variant, and the idle CPU."""
    document = to_json(results)
    columns = [f"{variant}/{baseline}" for variant, baseline in COMPARISONS]
    width = max(len(column) for column in columns) + 2
    lines = [
        f"client CPU per call (streaming: per message), {_PODS} pods behind a "
        f"{results.service} Service, {results.settings.rounds} rounds; loadavg "
        f"{results.loadavg}",
        "median of the per-round ratios [quartiles]",
        f"{'workload':<20}" + "".join(f"{column:>{width}}" for column in columns),
    ]
    for name, workload in document["workloads"].items():
        cells = []
        for column in columns:
            ratio = workload["ratios"][column]
            cells.append(f"{ratio['median']:.3f} [{ratio['q1']:.2f}-{ratio['q3']:.2f}]")
        lines.append(f"{name:<20}" + "".join(f"{cell:>{width}}" for cell in cells))
    for name, workload in document["workloads"].items():
        lines += ["", f"{name}: {'variant':<20}{'cpu us/' + workload['unit']:>16}"
                  f"{'p50 us':>10}{'p99 us':>10}{workload['unit'] + 's':>10}"]  # fmt: skip
        for variant, figures in workload["variants"].items():
            p50, p99 = figures["p50_us"], figures["p99_us"]
            lines.append(
                f"{'':<{len(name) + 2}}{variant:<20}{figures['cpu_us_per_unit']:>16.1f}"
                f"{'-' if p50 is None else f'{p50:.0f}':>10}"
                f"{'-' if p99 is None else f'{p99:.0f}':>10}{figures['units']:>10}"
            )
    idle = results.settings
    lines += [
        "",
        f"idle, {idle.idle_channels} channels of a kind open, {idle.idle_s:g} s after "
        f"{idle.idle_settle_s:g} s settling (ms of client CPU per second per channel, "
        "no-channel baseline subtracted):",
    ]
    for kind, figures in document["idle"].items():
        lines.append(f"  {kind:<14}{figures['ms_per_s_per_channel']:>8.2f} ms/s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``grpc-balance overhead --balanced``: measure, print the table (or ``--json``)."""
    import logging

    # The detector may judge a fresh channel's first calls: its warnings are noise here.
    logging.getLogger("grpc_balance_mw").setLevel(logging.ERROR)
    if args.quick:
        settings = Settings.quick()
    else:
        settings = Settings(
            rounds=args.rounds, calls=args.calls, threads=max(1, args.threads),
            tasks=max(1, args.aio_tasks), idle_s=args.idle_s, idle_settle_s=args.idle_settle_s,
        )  # fmt: skip
    results = measure(settings, args.service)
    if args.json:
        print(json.dumps(to_json(results), indent=2))
    else:
        print(report(results))
    return 0
