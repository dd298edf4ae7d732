"""``grpc-balance bench``: every strategy side by side on the embedded local cluster.

Scenarios (``--scenario``, or ``all`` in this order):

* ``steady``: 3 pods; each strategy makes ``--calls`` warm unary calls, interleaved with the
  others in ``--rounds`` rounds (the order turns each round) so drift in the machine's speed hits
  them all alike. Spread comes from the pods' own counts, reset before and read after each
  strategy's segment.
* ``scale-up``: 3 pods, then 5 after 2 s; each strategy calls from a thread of its own at 50
  calls/s (so each sees the new pods as soon as they come) for ``--scale-wait-s`` after the
  scale-up. ``seconds_to_new_pod_traffic``: from the scale-up to the first call a new pod served
  (null if none came within the wait); ``per_pod`` counts the calls after the scale-up, by the pod
  each response names.
* ``surge``: 3 pods of capacity 8 concurrent calls (50 ms each; calls beyond it queue on the
  pod); waves of ``--surge`` concurrent calls with omni's 250 ms deadline, interleaved. The
  pinned pod's queue makes calls late or fail; the other pods idle.
* ``pod-kill``: 3 pods (10 ms per call); each strategy calls from two threads at once (25
  calls/s each, at most ``--calls`` in all) for 6 s; half way the pod the plain channel is pinned
  to is SIGKILLed (the server-max-age cluster loses its channel's pod). Errors per strategy;
  the retrying strategies mark GetChargePoint (idempotent) retryable on UNAVAILABLE.
* ``streaming``: per strategy a server stream and a bidirectional stream held open for the whole
  run, and short server streams opened every 0.25 s, while the cluster goes 3 -> 5 -> 3 pods.
  ``calls``: streams opened; ``errors``: streams that failed; ``per_pod``: streams per pod;
  ``p50_ms``/``p99_ms``: time to the first message.
* ``gray-failure``: ``steady`` with pod 1 answering UNAVAILABLE to every call while its health
  check says SERVING (a bad config, a broken dependency); ``errors`` per strategy.
* ``slow-pod``, ``hung-pod``, ``fleet``: pods unequal in speed, a hung pod, many client
  processes (issue 23); see :mod:`grpc_balance_mw.cli.bench_fleet` for their fields.
* ``scale-down``: per strategy and variant a cluster of its own, 4 pods, calls at 100/s from
  one thread; after 5 s the newest pod leaves (variant ``graceful``: ``cluster.scale(3)``, a
  SIGTERM and drain; ``sigkill``: SIGKILL), and the calls go on for 30 s. Spread from the pods'
  own counts, read every 5 s; ``per_pod`` and ``max_share_over_fair``: from 10 s after the
  event (what a channel settles to). The observing strategies are told no ``expected_pods``.
* ``client-ip``, ``unidentified``, ``defaults``: what the package learns of the pods with default
  options, each strategy on a cluster of its own: behind sessionAffinity ClientIP, from pods that
  stamp no identity, and with no options at all. Their own fields are described in
  :mod:`grpc_balance_mw.cli.bench_membership`.

Every entry has ``"windows"``: ``[{"start_s", "end_s", "per_pod", "max_share_over_fair"}]``,
5 s each, times relative to the scenario's event (the scale-up, the SIGKILL, the scale-down;
negative: before it), fair shares over the pods alive in the window; empty for scenarios
without one event (steady, surge, streaming). From the pods' own counts in ``scale-down``
(each strategy has its cluster to itself), from the pod each response names otherwise.

``--json`` prints one document on stdout, ``{"schema": 1, "settings": {the run's settings},
"scenarios": [{"name", "strategy", "calls", "errors", "error_codes", "per_pod",
"max_share_over_fair", "p50_ms", "p99_ms", "alarm", "ejections" (the balanced channel's
outlier ejections, ``{"count", "pods": {pod: times}}``; null for strategies without a pool),
"windows", "seconds_to_new_pod_traffic"
(scale-up only), "variant" (scale-down and defaults), "note" (if any), and the membership
scenarios' own fields}, ...], "machine": {...}}``;
otherwise a table. Progress goes to stderr. Every loop is bounded in calls and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from grpc_balance_mw.cli import BENCH_SCENARIOS
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.cli.strategies import (
    MAX_AGE_S,
    STRATEGIES,
    Opened,
    Result,
    max_share_over_fair,
    open_strategy,
    unavailable_strategies,
)
from grpc_balance_mw.testing import LocalCluster, ServiceKind, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb

__all__ = ["RUNNERS", "SCENARIOS", "Settings", "burst", "document", "print_table"]

SCENARIOS = BENCH_SCENARIOS
PODS = 3
SCALED_PODS = 5
#: Surge: each pod serves this many calls at once, this long each; omni's deadline.
SURGE_CAPACITY, SURGE_SERVICE_MS, SURGE_DEADLINE_S = 8, 50.0, 0.25
SURGE_WAVES = 5
SCALE_AFTER_S, SCALE_RATE = 2.0, 50.0
KILL_RUN_S, KILL_WORKERS, KILL_RATE = 6.0, 2, 25.0
STREAM_RUN_S = 8.0
#: Windows of the spread after an event, and the scale-down scenario's shape.
WINDOW_S = 5.0
SCALE_DOWN_PODS, SCALE_DOWN_TO, SCALE_DOWN_RATE = 4, 3, 100.0
SCALE_DOWN_BEFORE_S, SCALE_DOWN_AFTER_S, SCALE_DOWN_SETTLED_S = 5.0, 30.0, 10.0
SCALE_DOWN_VARIANTS = ("graceful", "sigkill")
#: The version of ``--json``'s document: raised when a field changes meaning or goes away.
SCHEMA = 1
#: Every scenario stops after this long, whatever its counts say.
SCENARIO_LIMIT_S = 300.0


@dataclass(frozen=True)
class Settings:
    """What a run was asked for (the parsed arguments, typed)."""

    calls: int = 3000
    rounds: int = 10
    l4: ServiceKind = "userspace"
    strategies: tuple[str, ...] = STRATEGIES
    surge: int = 48
    scale_wait_s: float = 10.0
    rate: float = 0.0
    client_ip_s: float = 20.0
    long_window_s: float = 60.0
    run_s: float = 25.0
    clients: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            calls=args.calls,
            rounds=args.rounds,
            l4=args.l4,
            strategies=tuple(args.strategy or STRATEGIES),
            surge=args.surge,
            scale_wait_s=args.scale_wait_s,
            rate=args.rate,
            client_ip_s=args.client_ip_s,
            long_window_s=args.long_window_s,
            run_s=args.run_s,
            clients=args.clients,
        )


# -- clusters and channels ------------------------------------------------------------------


def cluster_parts(l4: ServiceKind) -> dict[str, Any]:
    """The DNS and L7 proxy a cluster of this L4 kind can have on this machine (with iptables
    the harness forwards each pod's address into its network namespace, so both work)."""
    l7 = None if missing_components(l7="haproxy") else "haproxy"
    return {"service": l4, "dns": "embedded", "l7": l7}


@contextlib.contextmanager
def clusters(
    settings: Settings, strategies: Sequence[str], **pod_settings: Any
) -> Iterator[tuple[LocalCluster, LocalCluster | None]]:
    """The cluster, and the cluster of max-age pods if ``server-max-age`` runs."""
    with contextlib.ExitStack() as stack:
        progress(f"starting a {PODS}-pod local cluster (service={settings.l4})")
        cluster = stack.enter_context(
            LocalCluster(PODS, **cluster_parts(settings.l4), **pod_settings)
        )
        aged = None
        if "server-max-age" in strategies:
            aged = stack.enter_context(
                LocalCluster(
                    PODS,
                    service=settings.l4,
                    dns=None,
                    l7=None,
                    max_connection_age_s=MAX_AGE_S,
                    **pod_settings,
                )
            )
        yield cluster, aged


@contextlib.contextmanager
def opened_strategies(
    settings: Settings,
    cluster: LocalCluster,
    aged: LocalCluster | None,
    skipped: list[Result],
    scenario: str,
) -> Iterator[list[Opened]]:
    """Every selected strategy this cluster can run, opened and warm; closed afterwards."""
    unavailable = unavailable_strategies(cluster)
    opened: list[Opened] = []
    try:
        for name in settings.strategies:
            if name in unavailable:
                progress(f"{name}: left out ({unavailable[name]})")
                skipped.append(Result(scenario, name, note=f"left out: {unavailable[name]}"))
                continue
            opened.append(open_strategy(name, cluster, max_age_cluster=aged, expected_pods=PODS))
        for strategy in opened:
            strategy.settle()
            for i in range(20):
                with contextlib.suppress(grpc.RpcError):
                    strategy.get(f"warm-up-{i}")
        yield opened
    finally:
        for strategy in opened:
            strategy.close()


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def segment(
    strategy: Opened,
    calls: int,
    result: Result,
    latencies: list[float],
    deadline: float = float("inf"),
    rate: float = 0.0,
) -> None:
    """``calls`` unary calls, back to back or ``rate`` per second, until ``deadline``."""
    started = time.monotonic()
    for i in range(calls):
        if rate:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        if time.monotonic() > deadline:
            return
        began = time.perf_counter()
        try:
            strategy.get(f"cp-{i}")
        except grpc.RpcError as error:
            result.calls += 1
            result.failed(_code(error))
            continue
        latencies.append((time.perf_counter() - began) * 1000)
        result.calls += 1


def _turned(opened: Sequence[Opened], by: int) -> list[Opened]:
    if not opened:
        return []
    by %= len(opened)
    return [*opened[by:], *opened[:by]]


# -- windows ---------------------------------------------------------------------------------


def window(start_s: float, end_s: float, per_pod: dict[str, int], pods: int) -> dict[str, Any]:
    """One entry of ``"windows"``: calls per pod from ``start_s`` to ``end_s`` after the event."""
    return {
        "start_s": round(start_s, 3),
        "end_s": round(end_s, 3),
        "per_pod": dict(sorted(per_pod.items())),
        "max_share_over_fair": max_share_over_fair(per_pod, pods),
    }


def windows_of(
    samples: Sequence[tuple[float, str]], pods: Callable[[float], int], width: float = WINDOW_S
) -> list[dict[str, Any]]:
    """Calls, as (seconds after the event, pod), counted in windows of ``width`` aligned on the
    event; ``pods(start_s)``: the pods alive then, which a fair share divides by."""
    buckets: dict[int, dict[str, int]] = {}
    for at, pod in samples:
        per_pod = buckets.setdefault(math.floor(at / width), {})
        per_pod[pod] = per_pod.get(pod, 0) + 1
    return [
        window(i * width, (i + 1) * width, buckets[i], pods(i * width)) for i in sorted(buckets)
    ]


def sliding_windows(
    windows: Sequence[dict[str, Any]], width: float, pods: int
) -> list[dict[str, Any]]:
    """Windows of ``width`` seconds made of consecutive ``windows`` (5 s each), one starting at
    each of them: every span of that length the run had, at the short windows' step."""
    count = max(1, round(width / WINDOW_S))
    joined = []
    for i in range(len(windows) - count + 1):
        group = windows[i : i + count]
        per_pod: dict[str, int] = {}
        for entry in group:
            for pod, calls in entry["per_pod"].items():
                per_pod[pod] = per_pod.get(pod, 0) + calls
        joined.append(window(group[0]["start_s"], group[-1]["end_s"], per_pod, pods))
    return joined


class PodCounts:
    """Windows from the pods' own counts: the cluster's counts read at each window's end, the
    calls in the window the difference from the previous read (a pod that left took its
    count along: it is left out of the windows after it left)."""

    def __init__(self, cluster: LocalCluster, event_at: float) -> None:
        self.cluster = cluster
        self.event_at = event_at
        self.windows: list[dict[str, Any]] = []
        cluster.reset_counts()
        self._read_at = time.monotonic()
        self._counts: dict[str, int] = {}

    def read(self, pods: int) -> None:
        now = time.monotonic()
        counts = self.cluster.served()
        per_pod = {pod: count - self._counts.get(pod, 0) for pod, count in counts.items()}
        start, end = self._read_at - self.event_at, now - self.event_at
        self.windows.append(window(start, end, per_pod, pods))
        self._read_at, self._counts = now, counts

    def since(self, start_s: float) -> dict[str, int]:
        """Calls per pod over the windows that start at ``start_s`` or later."""
        total: dict[str, int] = {}
        for entry in self.windows:
            if entry["start_s"] >= start_s - 0.5:  # reads run a little late
                for pod, count in entry["per_pod"].items():
                    total[pod] = total.get(pod, 0) + count
        return total


# -- scenarios ------------------------------------------------------------------------------


def steady(settings: Settings) -> list[Result]:
    return _steady(settings, "steady")


#: The gray-failure scenario's failing pod (by ordinal) and its status.
GRAY_FAILURE = {1: "UNAVAILABLE"}


def gray_failure(settings: Settings) -> list[Result]:
    """``steady`` with one pod answering UNAVAILABLE to every call while its health check
    says SERVING: the balanced channel ejects it (outlier detection); errors per strategy."""
    return _steady(settings, "gray-failure", fail_with=GRAY_FAILURE)


def _steady(settings: Settings, scenario: str, **pod_settings: Any) -> list[Result]:
    results: list[Result] = []
    with (
        clusters(settings, settings.strategies, **pod_settings) as (cluster, aged),
        opened_strategies(settings, cluster, aged, results, scenario) as opened,
    ):
        by_name = {s.strategy: Result(scenario, s.strategy) for s in opened}
        latencies: dict[str, list[float]] = {s.strategy: [] for s in opened}
        rounds = min(settings.rounds, settings.calls)
        limit = time.monotonic() + SCENARIO_LIMIT_S
        for number in range(rounds):
            progress(f"{scenario}: round {number + 1}/{rounds}")
            calls = settings.calls // rounds + (number < settings.calls % rounds)
            for strategy in _turned(opened, number):
                result = by_name[strategy.strategy]
                strategy.cluster.reset_counts()
                segment(
                    strategy,
                    calls,
                    result,
                    latencies[strategy.strategy],
                    deadline=limit,
                    rate=settings.rate,
                )
                result.count(strategy.cluster.served())
        for strategy in opened:
            result = by_name[strategy.strategy]
            strategy.report(result)
            results.append(result.finish(latencies[strategy.strategy], PODS))
    return _in_order(results, settings)


class Load:
    """Calls from worker threads, each strategy paced at its own rate, until stopped or spent.

    Args:
        opened: the strategies.
        scenario: the results' name.
        rate: calls per second per worker.
        workers: threads per strategy.
        budget: calls per worker at most.
        on_pod: called with (strategy, pod) after each call that succeeded (under a lock).
        on_call: called with (strategy, pod or None if it failed, when it began (monotonic),
            its milliseconds) after every call (under a lock).
        timeout: each call's deadline, seconds.
    """

    def __init__(
        self,
        opened: Sequence[Opened],
        scenario: str,
        *,
        rate: float,
        workers: int,
        budget: int,
        on_pod: Callable[[Result, str], None] | None = None,
        on_call: Callable[[Result, str | None, float, float], None] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.results = {s.strategy: Result(scenario, s.strategy) for s in opened}
        self.latencies: dict[str, list[float]] = {s.strategy: [] for s in opened}
        self._opened = opened
        self._rate = rate
        self._budget = budget
        self._on_pod = on_pod
        self._on_call = on_call
        self._timeout = timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(s,), daemon=True, name=f"bench {s.strategy}")
            for s in opened
            for _ in range(workers)
        ]

    def __enter__(self) -> Load:
        self._started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def wait(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _work(self, strategy: Opened) -> None:
        result = self.results[strategy.strategy]
        for i in range(self._budget):
            if self._stop.wait(max(0.0, self._started + i / self._rate - time.monotonic())):
                return
            began, started = time.perf_counter(), time.monotonic()
            try:
                pod: str | None = strategy.get(f"cp-{i}", timeout=self._timeout)
                code = None
            except grpc.RpcError as error:
                pod, code = None, _code(error)
            elapsed = (time.perf_counter() - began) * 1000
            with self._lock:
                if self._on_call is not None:
                    self._on_call(result, pod, started, elapsed)
                result.calls += 1
                if pod is None:
                    result.failed(code)
                    continue
                self.latencies[strategy.strategy].append(elapsed)
                if self._on_pod is not None:
                    self._on_pod(result, pod)

    def finish(self, pods: int, note: str | None = None) -> list[Result]:
        finished = []
        for strategy in self._opened:
            result = self.results[strategy.strategy]
            strategy.report(result)
            result.note = note
            finished.append(result.finish(self.latencies[strategy.strategy], pods))
        return finished


def scale_up(settings: Settings) -> list[Result]:
    results: list[Result] = []
    with (
        clusters(settings, settings.strategies) as (cluster, aged),
        opened_strategies(settings, cluster, aged, results, "scale-up") as opened,
    ):
        first_pods = {pod.name for c in (cluster, aged) if c is not None for pod in c.pods}
        new_pods: set[str] = set()
        #: strategy -> when its cluster's new pods were in the Service
        scaled: dict[str, float] = {}
        samples: dict[str, list[tuple[float, str]]] = {s.strategy: [] for s in opened}

        def on_pod(result: Result, pod: str) -> None:
            at = scaled.get(result.strategy)
            if at is None:
                return
            samples[result.strategy].append((time.monotonic() - at, pod))
            result.per_pod[pod] = result.per_pod.get(pod, 0) + 1
            if pod in new_pods and result.seconds_to_new_pod_traffic is None:
                result.seconds_to_new_pod_traffic = round(time.monotonic() - at, 3)

        budget = int((SCALE_AFTER_S + settings.scale_wait_s + 5) * SCALE_RATE)
        load = Load(opened, "scale-up", rate=SCALE_RATE, workers=1, budget=budget, on_pod=on_pod)
        with load:
            progress(f"scale-up: {SCALE_RATE:g} calls/s per strategy")
            load.wait(SCALE_AFTER_S)
            progress(f"scale-up: {PODS} -> {SCALED_PODS} pods")
            for c in (cluster, aged):
                if c is None:
                    continue
                before = {p.name for p in c.pods}
                c.scale(SCALED_PODS)
                now = time.monotonic()
                new_pods.update({p.name for p in c.pods} - before - first_pods)
                for strategy in opened:
                    if strategy.cluster is c:
                        scaled[strategy.strategy] = now
            progress(f"scale-up: watching for {settings.scale_wait_s:g} s")
            load.wait(settings.scale_wait_s)
        finished = load.finish(
            SCALED_PODS,
            "per_pod and max_share_over_fair: the calls after the scale-up, by the pod each "
            "response names",
        )
        for result in finished:
            result.windows = windows_of(samples[result.strategy], lambda _start: SCALED_PODS)
        results += finished
    return _in_order(results, settings)


def surge(settings: Settings) -> list[Result]:
    results: list[Result] = []
    with (
        clusters(
            settings,
            settings.strategies,
            service_time_ms=SURGE_SERVICE_MS,
            max_concurrent=SURGE_CAPACITY,
            overflow="queue",
        ) as (cluster, aged),
        opened_strategies(settings, cluster, aged, results, "surge") as opened,
    ):
        by_name = {s.strategy: Result("surge", s.strategy) for s in opened}
        latencies: dict[str, list[float]] = {s.strategy: [] for s in opened}
        for wave in range(SURGE_WAVES):
            progress(f"surge: wave {wave + 1}/{SURGE_WAVES} of {settings.surge} concurrent calls")
            for strategy in _turned(opened, wave):
                result = by_name[strategy.strategy]
                strategy.cluster.reset_counts()
                burst(strategy.stub, settings.surge, result, latencies[strategy.strategy])
                result.count(strategy.cluster.served())
        for strategy in opened:
            result = by_name[strategy.strategy]
            strategy.report(result)
            result.note = (
                f"{SURGE_WAVES} waves of {settings.surge} concurrent calls, pods of capacity "
                f"{SURGE_CAPACITY} x {SURGE_SERVICE_MS:g} ms (the rest queue), deadline "
                f"{SURGE_DEADLINE_S * 1000:g} ms; p50/p99 over every call, failed ones at "
                "their failure"
            )
            results.append(result.finish(latencies[strategy.strategy], PODS))
    return _in_order(results, settings)


def burst(
    stub: Any,
    calls: int,
    result: Result,
    latencies: list[float],
    served: list[tuple[float, str | None]] | None = None,
) -> None:
    """``calls`` calls at once (futures), each with the surge deadline; waits for them all.

    ``served`` gets (seconds after the burst began, the pod or None) per call.
    """
    ended: list[float | None] = [None] * calls
    futures = []
    began = time.perf_counter()
    for i in range(calls):

        def done(_future: Any, i: int = i) -> None:
            ended[i] = time.perf_counter()  # on grpcio's thread: record, never wait

        future = stub.GetChargePoint.future(
            pb.GetChargePointRequest(id=f"surge-{i}"), timeout=SURGE_DEADLINE_S
        )
        future.add_done_callback(done)
        futures.append(future)
    for i, future in enumerate(futures):
        pod = None
        try:
            pod = str(future.result(timeout=SURGE_DEADLINE_S + 5).served_by)
        except grpc.RpcError as error:
            result.failed(_code(error))
        except grpc.FutureTimeoutError:
            future.cancel()
            result.failed(grpc.StatusCode.DEADLINE_EXCEEDED)
        result.calls += 1
        end = ended[i]
        elapsed = (end if end is not None else time.perf_counter()) - began
        latencies.append(elapsed * 1000)
        if served is not None:
            served.append((elapsed, pod))


def pod_kill(settings: Settings) -> list[Result]:
    results: list[Result] = []
    with (
        clusters(settings, settings.strategies, service_time_ms=10.0) as (cluster, aged),
        opened_strategies(settings, cluster, aged, results, "pod-kill") as opened,
    ):
        victims = _victims(opened, cluster, aged)
        samples: dict[str, list[tuple[float, str]]] = {s.strategy: [] for s in opened}
        killed_at = time.monotonic()

        def on_call(result: Result, pod: str | None, started: float, _ms: float) -> None:
            # By when the call began, not when its answer was read: the killed pod's last
            # answers, sent before the SIGKILL, can be read after it.
            if pod is not None:
                samples[result.strategy].append((started, pod))
                result.per_pod[pod] = result.per_pod.get(pod, 0) + 1

        budget = max(1, settings.calls // KILL_WORKERS)
        load = Load(
            opened, "pod-kill", rate=KILL_RATE, workers=KILL_WORKERS, budget=budget, on_call=on_call
        )
        with load:
            progress(f"pod-kill: {KILL_WORKERS} threads per strategy for {KILL_RUN_S:g} s")
            load.wait(KILL_RUN_S / 2)
            for target, victim in victims:
                progress(f"pod-kill: SIGKILL {victim}")
                target.kill(victim)
            killed_at = time.monotonic()  # a call begun from here on found its pod dead
            load.wait(KILL_RUN_S / 2)
        killed = ", ".join(victim for _, victim in victims)
        finished = load.finish(PODS, f"killed {killed} (the plain channel's pod) half way")
        for result in finished:
            since_kill = [(at - killed_at, pod) for at, pod in samples[result.strategy]]
            result.windows = windows_of(since_kill, lambda start: PODS if start < 0 else PODS - 1)
        results += finished
    return _in_order(results, settings)


def _victims(
    opened: Sequence[Opened], cluster: LocalCluster, aged: LocalCluster | None
) -> list[tuple[LocalCluster, str]]:
    """The pod each cluster loses: the one its plain channel (or server-max-age's) is on."""
    victims = []
    for target, pinned in ((cluster, "plain"), (aged, "server-max-age")):
        if target is None:
            continue
        chosen = next((s for s in opened if s.strategy == pinned), None)
        pod = chosen.get("which-pod") if chosen is not None else target.pods[0].name
        victims.append((target, pod))
    return victims


def streaming(settings: Settings) -> list[Result]:
    results: list[Result] = []
    with (
        clusters(settings, settings.strategies) as (cluster, aged),
        opened_strategies(settings, cluster, aged, results, "streaming") as opened,
    ):
        by_name = {s.strategy: Result("streaming", s.strategy) for s in opened}
        latencies: dict[str, list[float]] = {s.strategy: [] for s in opened}
        held: dict[str, list[str]] = {s.strategy: [] for s in opened}
        lock = threading.Lock()
        stop = threading.Event()
        ends = time.monotonic() + STREAM_RUN_S

        def record(strategy: Opened, first_ms: float | None, pod: str | None, error: Any) -> None:
            with lock:
                result = by_name[strategy.strategy]
                result.calls += 1
                if pod is not None:
                    result.per_pod[pod] = result.per_pod.get(pod, 0) + 1
                if first_ms is not None:
                    latencies[strategy.strategy].append(first_ms)
                if error is not None:
                    result.failed(_code(error))

        def watch(strategy: Opened, updates: int, interval_ms: int, mark: str | None) -> None:
            began = time.perf_counter()
            first_ms, pod, failure, got = None, None, None, 0
            request = pb.WatchStatusRequest(id="cp-1", updates=updates, interval_ms=interval_ms)
            try:
                for update in strategy.stub.WatchStatus(request, timeout=STREAM_RUN_S + 10):
                    if first_ms is None:
                        first_ms = (time.perf_counter() - began) * 1000
                        pod = str(update.served_by)
                    got += 1
            except grpc.RpcError as error:
                failure = error
            record(strategy, first_ms, pod, failure)
            if mark is not None:
                outcome = "failed" if failure is not None else f"{got}/{updates} messages"
                with lock:
                    held[strategy.strategy].append(f"{mark} {outcome}")

        def session(strategy: Opened) -> None:
            def messages() -> Iterator[pb.SessionMessage]:
                sent = 0
                while not stop.is_set() and time.monotonic() < ends and sent < 1000:
                    yield pb.SessionMessage(charge_point_id="cp-1", command=f"m{sent}")
                    sent += 1
                    stop.wait(0.1)

            began = time.perf_counter()
            first_ms, pod, failure, got = None, None, None, 0
            try:
                for reply in strategy.stub.Session(messages(), timeout=STREAM_RUN_S + 10):
                    if first_ms is None:
                        first_ms = (time.perf_counter() - began) * 1000
                        pod = str(reply.served_by)
                    got += 1
            except grpc.RpcError as error:
                failure = error
            record(strategy, first_ms, pod, failure)
            outcome = "failed" if failure is not None else f"{got} replies"
            with lock:
                held[strategy.strategy].append(f"bidi {outcome}")

        def short_streams(strategy: Opened) -> None:
            for _ in range(int(STREAM_RUN_S / 0.25)):
                if stop.wait(0.25) or time.monotonic() > ends - 0.5:
                    return
                watch(strategy, 3, 50, None)

        updates = int(STREAM_RUN_S / 0.1)
        threads = []
        for s in opened:
            threads += [
                threading.Thread(target=watch, args=(s, updates, 100, "server"), daemon=True),
                threading.Thread(target=session, args=(s,), daemon=True),
                threading.Thread(target=short_streams, args=(s,), daemon=True),
            ]
        for thread in threads:
            thread.start()
        progress(f"streaming: {len(opened) * 2} streams held open for {STREAM_RUN_S:g} s")
        stop.wait(STREAM_RUN_S * 0.25)
        progress(f"streaming: {PODS} -> {SCALED_PODS} pods")
        for c in (cluster, aged):
            if c is not None:
                c.scale(SCALED_PODS)
        stop.wait(max(0.0, ends - STREAM_RUN_S * 0.35 - time.monotonic()))
        progress(f"streaming: {SCALED_PODS} -> {PODS} pods (the new ones leave)")
        for c in (cluster, aged):
            if c is not None:
                c.scale(PODS)
        for thread in threads:
            thread.join(timeout=max(1.0, ends + 10 - time.monotonic()))
        stop.set()
        for strategy in opened:
            result = by_name[strategy.strategy]
            strategy.report(result)
            result.note = "held open: " + ", ".join(sorted(held[strategy.strategy]))
            results.append(result.finish(latencies[strategy.strategy], SCALED_PODS))
    return _in_order(results, settings)


def scale_down(settings: Settings) -> list[Result]:
    results = [
        _scale_down(settings, name, variant)
        for variant in SCALE_DOWN_VARIANTS
        for name in settings.strategies
    ]
    return _in_order(results, settings)


def _scale_down(settings: Settings, name: str, variant: str) -> Result:
    """One strategy, one variant, on a cluster of its own (so the pods' counts are its own)."""
    aged = name == "server-max-age"
    parts: dict[str, Any] = cluster_parts(settings.l4)
    if aged:
        parts = {"service": settings.l4, "dns": None, "max_connection_age_s": MAX_AGE_S}
    progress(f"scale-down ({variant}): {name}")
    with LocalCluster(SCALE_DOWN_PODS, **parts) as cluster:
        unavailable = unavailable_strategies(cluster)
        if name in unavailable:
            note = f"left out: {unavailable[name]}"
            return Result("scale-down", name, variant=variant, note=note)
        strategy = open_strategy(
            name, cluster, max_age_cluster=cluster if aged else None, expected_pods=None
        )
        try:
            strategy.settle()
            for i in range(20):
                with contextlib.suppress(grpc.RpcError):
                    strategy.get(f"warm-up-{i}")
            budget = int((SCALE_DOWN_BEFORE_S + SCALE_DOWN_AFTER_S + 10) * SCALE_DOWN_RATE)
            load = Load([strategy], "scale-down", rate=SCALE_DOWN_RATE, workers=1, budget=budget)
            with load:
                counts = PodCounts(cluster, time.monotonic() + SCALE_DOWN_BEFORE_S)
                load.wait(SCALE_DOWN_BEFORE_S)
                counts.event_at = time.monotonic()
                counts.read(SCALE_DOWN_PODS)
                leaving = cluster.pods[-1].name
                if variant == "graceful":
                    cluster.scale(SCALE_DOWN_TO)
                else:
                    cluster.kill(leaving)
                for i in range(1, int(SCALE_DOWN_AFTER_S / WINDOW_S) + 1):
                    load.wait(max(0.0, counts.event_at + i * WINDOW_S - time.monotonic()))
                    counts.read(SCALE_DOWN_TO)
            (result,) = load.finish(
                SCALE_DOWN_TO,
                f"{leaving} left ({variant}) {SCALE_DOWN_BEFORE_S:g} s in; per_pod and "
                f"max_share_over_fair: from {SCALE_DOWN_SETTLED_S:g} s after, by the pods' counts",
            )
        finally:
            strategy.close()
    result.variant = variant
    result.windows = counts.windows
    result.per_pod = counts.since(SCALE_DOWN_SETTLED_S)
    result.max_share_over_fair = max_share_over_fair(result.per_pod, SCALE_DOWN_TO)
    return result


RUNNERS: dict[str, Callable[[Settings], list[Result]]] = {
    "steady": steady,
    "scale-up": scale_up,
    "surge": surge,
    "pod-kill": pod_kill,
    "streaming": streaming,
    "scale-down": scale_down,
    "gray-failure": gray_failure,
}


def _in_order(results: list[Result], settings: Settings) -> list[Result]:
    order = {name: i for i, name in enumerate(settings.strategies)}
    return sorted(results, key=lambda r: order.get(r.strategy, len(order)))


# -- the document and the table ---------------------------------------------------------------


def document(results: Sequence[Result], settings: Settings) -> dict[str, Any]:
    """The benchmark's JSON document."""
    from grpc_balance_mw import __version__

    return {
        "schema": SCHEMA,
        "settings": {**asdict(settings), "strategies": list(settings.strategies)},
        "scenarios": [result.as_json() for result in results],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "grpc_balance_mw": __version__,
            "l4": settings.l4,
            # Other work on the machine skews latencies (not spreads): say how busy it was.
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: Sequence[Result]) -> None:
    header = (
        f"{'scenario':10} {'strategy':21} {'calls':>6} {'errors':>6} {'max/fair':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'new pod s':>9}  alarm"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.note and r.note.startswith("left out"):
            print(f"{r.name:10} {r.strategy:21} {r.note}")
            continue
        new_pod = _fmt(r.seconds_to_new_pod_traffic) if r.name == "scale-up" else ""
        print(
            f"{r.name:10} {r.strategy:21} {r.calls:6d} {r.errors:6d} "
            f"{_fmt(r.max_share_over_fair):>8} {_fmt(r.p50_ms, 3):>8} {_fmt(r.p99_ms, 3):>8} "
            f"{new_pod:>9}  {r.alarm or '-'}"
        )
