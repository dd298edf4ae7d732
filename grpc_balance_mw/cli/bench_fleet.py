"""``bench``'s fleet-grade scenarios (issue 23): pods unequal in speed, a hung pod, many clients.

* ``slow-pod``: 3 pods of capacity ``SLOW_CAPACITY`` calls at once (the rest queue on the pod),
  ``SLOW_SERVICE_MS`` per call; ``charge-points-2`` at half speed (twice the service time), so
  its share of the capacity is 1/5. Per strategy a cluster of its own and ``--clients`` client
  processes (default 4, :mod:`grpc_balance_mw.cli.bench_client`), together offering 80 % of
  the total capacity at a fixed rate, open loop, for ``--run-s`` seconds. ``p50_ms``/``p99_ms``:
  every call, a failed one at its failure (deadline ``CALL_DEADLINE_S``). Its own fields:
  ``slow_pod``, ``capacity_share`` (each pod's share of the capacity), ``share_after_settled``
  (each pod's share of the calls sent ``settled_after_s`` or more after the start:
  ``SETTLED_S``, or half the run if shorter) and
  ``slow_share_over_capacity_share`` (the slow pod's share over its share of the capacity: 1.0
  is right; an even spread gives 5/3), ``offered_calls_per_s``, ``capacity_calls_per_s``.
* ``hung-pod``: 3 pods (10 ms per call); every strategy at once on one cluster, two threads each
  at 25 calls/s, calls with a ``HUNG_DEADLINE_S`` deadline; after ``HUNG_BEFORE_S`` the pod the
  plain channel is on is SIGSTOPped (it hangs: the kernel still accepts its connections, nothing
  answers) for ``--run-s`` seconds, then SIGCONTed (always, even on an error). Its own fields:
  ``hung_pod``, ``failed_after_hang`` (calls that failed after it), ``last_failure_after_hang_s``
  (when the last of them failed, from the SIGSTOP; null: none), ``slow_calls_after_hang``
  (calls in flight at the hang or later that took over ``SLOW_CALL_S``; with this deadline only
  a stalled client makes one), and ``hung_pod_answered_after_resume`` (its admin service
  answered after the SIGCONT: the process ran on).
* ``fleet``: 6 pods (capacity 4, 50 ms), per strategy a cluster of its own and ``--clients``
  client processes (default 8) offering 60 % of the capacity at a fixed rate each for
  ``--run-s`` seconds; the balanced strategies with at most ``FLEET_LANES`` lanes per client
  (``PoolConfig(min_lanes=3, max_lanes=4)``; ``balanced-subset`` adds ``subset=SubsetRule()``
  and runs after ``balanced`` unless ``--strategy`` says otherwise). ``max_share_over_fair``:
  the pods' load over the run (the pod each response names); ``windows``: per 5 s from the
  start. Its own fields:
  ``clients``, ``calls_per_client``, ``max_window_share_over_fair`` (the worst full window),
  ``lanes_per_client_max`` (the most lanes any client had taking calls, sampled), and
  ``connections_per_pod`` with ``connections_per_pod_max_over_mean``: the pods cannot count
  their connections, so these count the clients' lanes per pod at the end of the run (null for
  strategies without lanes); ``lanes_moved``, ``lanes_left_crowded`` and
  ``dials_redialled_crowded``: the subset rule's moves to pods holding fewer connections, leaves
  of crowded pods, and new connections it did not keep on a crowded pod, summed over the clients.

Every balanced strategy's entry, here as in every scenario, has ``ejections``: ``{"count",
"pods": {pod: times}}``, summed over its client processes. Each loop is bounded in calls
(rate times seconds, at most :data:`grpc_balance_mw.cli.bench_client.MAX_CALLS` per client)
and in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from grpc_balance_mw.cli import STRATEGIES, SUBSET_STRATEGY
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.cli.bench import (
    PODS,
    Load,
    Settings,
    _in_order,
    _victims,
    cluster_parts,
    clusters,
    opened_strategies,
    windows_of,
)
from grpc_balance_mw.cli.strategies import (
    MAX_AGE_S,
    Result,
    Targets,
    max_share_over_fair,
    unavailable_strategies,
)
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.process import ChildProcess, ClusterError, python_module

__all__ = ["RUNNERS", "fleet", "hung_pod", "slow_pod"]

#: Every call's deadline in the multi-process scenarios.
CALL_DEADLINE_S = 5.0
#: slow-pod: the pods, the slow one and how much slower, the load offered.
SLOW_SERVICE_MS, SLOW_CAPACITY, SLOW_FACTOR, SLOW_ORDINAL = 50.0, 4, 2.0, 2
SLOW_LOAD, SLOW_CLIENTS = 0.8, 4
#: slow-pod: shares are judged on the calls sent this long after the start, or later.
SETTLED_S = 10.0
#: hung-pod: the load, the calls' deadline, the time before the hang, a slow call.
HUNG_WORKERS, HUNG_RATE, HUNG_SERVICE_MS = 2, 25.0, 10.0
HUNG_DEADLINE_S, HUNG_BEFORE_S, SLOW_CALL_S = 1.0, 5.0, 2.0
#: fleet: the pods, their capacity, the load, the clients and their lanes.
FLEET_PODS, FLEET_SERVICE_MS, FLEET_CAPACITY = 6, 50.0, 4
FLEET_LOAD, FLEET_CLIENTS, FLEET_LANES, FLEET_MIN_LANES = 0.6, 8, 4, 3
#: How long a client process may take to start and warm up.
CLIENT_START_S = 60.0


# -- client processes -------------------------------------------------------------------------


@contextlib.contextmanager
def strategy_cluster(
    settings: Settings, strategy: str, pods: int, **pod_settings: Any
) -> Iterator[LocalCluster]:
    """A cluster for one strategy: the L7 proxy and the DNS only for the strategy that uses
    them; pods with a connection age for ``server-max-age``."""
    parts: dict[str, Any] = cluster_parts(settings.l4)
    if strategy == "server-max-age":
        parts = {"service": settings.l4, "dns": None, "l7": None}
        pod_settings["max_connection_age_s"] = MAX_AGE_S
    else:
        parts["l7"] = parts["l7"] if strategy == "l7-proxy" else None
        parts["dns"] = parts["dns"] if strategy == "headless-round-robin" else None
    with LocalCluster(pods, **parts, **pod_settings) as cluster:
        yield cluster


class Clients:
    """``count`` client processes of one strategy against ``cluster``, started and warm on
    entry, stopped on exit.

    Args:
        spec: what each client does (see :mod:`grpc_balance_mw.cli.bench_client`), less its
            targets and phase, which this fills in.
    """

    def __init__(self, cluster: LocalCluster, count: int, spec: dict[str, Any]) -> None:
        self.cluster = cluster
        self.spec = spec
        rate = float(spec["rate"])
        assert cluster.workdir is not None
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.processes = []
        for i in range(count):
            own = {
                **spec,
                "targets": Targets.of(cluster).__dict__,
                "phase_s": i / (rate * count),  # spread the clients' ticks over the interval
            }
            argv = python_module("grpc_balance_mw.cli.bench_client", json.dumps(own))
            self.processes.append(
                ChildProcess(
                    argv, name=f"client-{i}", log_dir=cluster.workdir, control=True, env=env
                )
            )

    def __enter__(self) -> Clients:
        try:
            for process in self.processes:
                process.start()
            for process in self.processes:
                process.wait_ready(CLIENT_START_S)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        for process in self.processes:
            process.stop(grace_s=1.0)

    def run(self) -> list[dict[str, Any]]:
        """Start every client's load together; each one's outcome when it is done."""
        for process in self.processes:
            process.request("go")
        wait = float(self.spec["seconds"]) + float(self.spec["deadline_s"]) + 60
        outcomes: list[dict[str, Any]] = [
            json.loads(process.read_line(wait)) for process in self.processes
        ]
        return outcomes


def merged_ejections(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The clients' ejections summed: ``{"count", "pods": {pod: times}}``, None without a pool."""
    found = [o["ejections"] for o in outcomes if o.get("ejections") is not None]
    if not found:
        return None
    pods: dict[str, int] = {}
    for entry in found:
        for pod, times in entry["pods"].items():
            pods[pod] = pods.get(pod, 0) + times
    return {"count": sum(entry["count"] for entry in found), "pods": dict(sorted(pods.items()))}


def result_of(
    scenario: str, strategy: str, outcomes: Sequence[dict[str, Any]], pods: int
) -> Result:
    """The clients' calls as one entry: counts, per pod, percentiles over every call (a failed
    one at its failure), 5 s windows from the start by the pod each response names."""
    result = Result(scenario, strategy)
    latencies: list[float] = []
    samples: list[tuple[float, str]] = []
    for outcome in outcomes:
        for sent_s, latency_ms, pod, status in outcome["calls"]:
            result.calls += 1
            latencies.append(latency_ms)
            if pod is None:
                result.error_codes[status] = result.error_codes.get(status, 0) + 1
                result.errors += 1
                continue
            result.per_pod[pod] = result.per_pod.get(pod, 0) + 1
            samples.append((sent_s + latency_ms / 1000, pod))
        for _ in range(outcome["unanswered"]):
            result.calls += 1
            result.failed(None)
    result.finish(latencies, pods)
    result.per_pod = dict(sorted(result.per_pod.items()))
    result.windows = windows_of(samples, lambda _start: pods)
    result.ejections = merged_ejections(outcomes)
    result.figures["clients"] = len(outcomes)
    result.figures["calls_per_client"] = [len(o["calls"]) + o["unanswered"] for o in outcomes]
    return result


def _left_out(cluster: LocalCluster, scenario: str, strategy: str) -> Result | None:
    missing = unavailable_strategies(cluster).get(strategy)
    if missing is None:
        return None
    progress(f"{scenario}: {strategy}: left out ({missing})")
    return Result(scenario, strategy, note=f"left out: {missing}")


# -- slow-pod -------------------------------------------------------------------------------


def capacity_shares(service_ms: dict[str, float], capacity: int) -> dict[str, float]:
    """Each pod's share of the calls per second all of them can serve."""
    rates = {pod: capacity * 1000 / ms for pod, ms in service_ms.items()}
    total = sum(rates.values())
    return {pod: round(rate / total, 4) for pod, rate in sorted(rates.items())}


def slow_pod(settings: Settings) -> list[Result]:
    results = [_slow_pod(settings, name) for name in settings.strategies]
    return _in_order(results, settings)


def _slow_pod(settings: Settings, strategy: str) -> Result:
    clients = settings.clients or SLOW_CLIENTS
    progress(f"slow-pod: {strategy}, {clients} client processes")
    with strategy_cluster(
        settings,
        strategy,
        PODS,
        service_time_ms=SLOW_SERVICE_MS,
        max_concurrent=SLOW_CAPACITY,
        overflow="queue",
    ) as cluster:
        left_out = _left_out(cluster, "slow-pod", strategy)
        if left_out is not None:
            return left_out
        slow = cluster.pods[SLOW_ORDINAL].name
        cluster.configure(slow, service_time_ms=SLOW_SERVICE_MS * SLOW_FACTOR)
        service_ms = {pod.name: pod.settings.service_time_ms for pod in cluster.pods}
        shares = capacity_shares(service_ms, SLOW_CAPACITY)
        capacity = sum(SLOW_CAPACITY * 1000 / ms for ms in service_ms.values())
        offered = SLOW_LOAD * capacity
        spec = {
            "strategy": strategy,
            "rate": offered / clients,
            "seconds": settings.run_s,
            "deadline_s": CALL_DEADLINE_S,
            "pods": PODS,
        }
        with Clients(cluster, clients, spec) as running:
            outcomes = running.run()
    result = result_of("slow-pod", strategy, outcomes, PODS)
    settled_s = min(SETTLED_S, settings.run_s / 2)  # a short run: its second half
    settled: dict[str, int] = {pod: 0 for pod in shares}
    for outcome in outcomes:
        for sent_s, _latency, pod, _status in outcome["calls"]:
            if pod is not None and sent_s >= settled_s:
                settled[pod] = settled.get(pod, 0) + 1
    total = sum(settled.values())
    share_after = {pod: round(n / total, 4) for pod, n in settled.items()} if total else {}
    result.figures.update(
        slow_pod=slow,
        capacity_share=shares,
        capacity_calls_per_s=round(capacity, 1),
        offered_calls_per_s=round(offered, 1),
        settled_after_s=settled_s,
        per_pod_after_settled=settled,
        share_after_settled=share_after,
        slow_share_over_capacity_share=(
            round(share_after[slow] / shares[slow], 3) if share_after else None
        ),
    )
    result.note = (
        f"{clients} client processes, {offered:g} calls/s together ({SLOW_LOAD:.0%} of the "
        f"capacity), open loop, for {settings.run_s:g} s; pods of capacity {SLOW_CAPACITY} x "
        f"{SLOW_SERVICE_MS:g} ms, {slow} at {SLOW_SERVICE_MS * SLOW_FACTOR:g} ms; shares after "
        f"{settled_s:g} s"
    )
    return result


# -- hung-pod -------------------------------------------------------------------------------


def hung_pod(settings: Settings) -> list[Result]:
    results: list[Result] = []
    with (
        clusters(settings, settings.strategies, service_time_ms=HUNG_SERVICE_MS) as (
            cluster,
            aged,
        ),
        opened_strategies(settings, cluster, aged, results, "hung-pod") as opened,
    ):
        victims = _victims(opened, cluster, aged)
        hung_at: dict[str, float] = {}  # strategy -> when its cluster's pod hung
        calls: dict[str, list[tuple[float, float, str | None]]] = {s.strategy: [] for s in opened}

        def on_call(result: Result, pod: str | None, began: float, elapsed_ms: float) -> None:
            calls[result.strategy].append((began, elapsed_ms, pod))
            if pod is not None:
                result.per_pod[pod] = result.per_pod.get(pod, 0) + 1

        budget = int((HUNG_BEFORE_S + settings.run_s + 5) * HUNG_RATE)
        load = Load(
            opened, "hung-pod", rate=HUNG_RATE, workers=HUNG_WORKERS, budget=budget,
            on_call=on_call, timeout=HUNG_DEADLINE_S,
        )  # fmt: skip
        answered: dict[str, bool] = {}
        paused: list[tuple[LocalCluster, str]] = []
        try:
            with load:  # stopped, its calls ended (each within its deadline), before SIGCONT
                progress(f"hung-pod: {HUNG_WORKERS} threads per strategy, {HUNG_RATE:g} calls/s")
                load.wait(HUNG_BEFORE_S)
                for target, victim in victims:
                    progress(f"hung-pod: SIGSTOP {victim} for {settings.run_s:g} s")
                    target.pause(victim)
                    paused.append((target, victim))
                    now = time.monotonic()
                    for strategy in opened:
                        if strategy.cluster is target:
                            hung_at[strategy.strategy] = now
                load.wait(settings.run_s)
        finally:
            for target, victim in paused:
                target.resume(victim)
        for target, victim in paused:
            progress(f"hung-pod: SIGCONT {victim}")
            try:
                target.pod(victim).stats()
                answered[victim] = True
            except (grpc.RpcError, ClusterError):
                answered[victim] = False
        hung_pods = {target: victim for target, victim in victims}
        finished = load.finish(
            PODS,
            f"{', '.join(hung_pods.values())} (the plain channel's pod) hung "
            f"{HUNG_BEFORE_S:g} s in, for {settings.run_s:g} s; calls' deadline "
            f"{HUNG_DEADLINE_S:g} s",
        )
        for result in finished:
            strategy = next(s for s in opened if s.strategy == result.strategy)
            victim = hung_pods[strategy.cluster]
            at = hung_at.get(result.strategy, time.monotonic())
            result.figures = hung_figures(calls[result.strategy], at)
            result.figures["hung_pod"] = victim
            result.figures["hung_pod_answered_after_resume"] = answered.get(victim, False)
            since = [(began + ms / 1000 - at, pod) for began, ms, pod in calls[result.strategy]]
            result.windows = windows_of(
                [(t, pod) for t, pod in since if pod is not None],
                lambda start: PODS if start < 0 else PODS - 1,
            )
        results += finished
    return _in_order(results, settings)


def hung_figures(
    calls: Sequence[tuple[float, float, str | None]], hung_at: float
) -> dict[str, Any]:
    """From each call's (began, milliseconds, pod or None if it failed): failures after the
    hang, the last of them (seconds after it), calls in flight then or later over SLOW_CALL_S."""
    failures = [
        began + ms / 1000 - hung_at
        for began, ms, pod in calls
        if pod is None and began + ms / 1000 >= hung_at
    ]
    slow = sum(
        1 for began, ms, _pod in calls if began + ms / 1000 >= hung_at and ms > 1000 * SLOW_CALL_S
    )
    return {
        "failed_after_hang": len(failures),
        "last_failure_after_hang_s": round(max(failures), 3) if failures else None,
        "slow_calls_after_hang": slow,
    }


# -- fleet ----------------------------------------------------------------------------------


def fleet(settings: Settings) -> list[Result]:
    results = [_fleet(settings, name) for name in fleet_strategies(settings)]
    return _in_order(results, settings)


def fleet_strategies(settings: Settings) -> tuple[str, ...]:
    """The strategies asked for; by default (all of them) also ``balanced-subset``, right after
    ``balanced``: the subset rule is what keeps many clients' few lanes even."""
    names = settings.strategies
    if names != STRATEGIES or "balanced" not in names:
        return names
    at = names.index("balanced") + 1
    return (*names[:at], SUBSET_STRATEGY, *names[at:])


def _fleet(settings: Settings, strategy: str) -> Result:
    clients = settings.clients or FLEET_CLIENTS
    progress(f"fleet: {strategy}, {clients} client processes x {FLEET_PODS} pods")
    with strategy_cluster(
        settings,
        strategy,
        FLEET_PODS,
        service_time_ms=FLEET_SERVICE_MS,
        max_concurrent=FLEET_CAPACITY,
        overflow="queue",
    ) as cluster:
        left_out = _left_out(cluster, "fleet", strategy)
        if left_out is not None:
            return left_out
        capacity = FLEET_PODS * FLEET_CAPACITY * 1000 / FLEET_SERVICE_MS
        spec = {
            "strategy": strategy,
            "rate": FLEET_LOAD * capacity / clients,
            "seconds": settings.run_s,
            "deadline_s": CALL_DEADLINE_S,
            "pods": FLEET_PODS,
            "min_lanes": FLEET_MIN_LANES,
            "max_lanes": FLEET_LANES,
        }
        pods = [pod.name for pod in cluster.pods]
        with Clients(cluster, clients, spec) as running:
            outcomes = running.run()
    result = result_of("fleet", strategy, outcomes, FLEET_PODS)
    result.figures.update(fleet_figures(result, outcomes, pods))
    result.note = (
        f"{clients} client processes x {FLEET_PODS} pods (capacity {FLEET_CAPACITY} x "
        f"{FLEET_SERVICE_MS:g} ms), {FLEET_LOAD:.0%} of the capacity for {settings.run_s:g} s; "
        f"balanced: at most {FLEET_LANES} lanes per client; connections: the clients' lanes "
        "per pod at the end (the pods cannot count their connections)"
    )
    return result


def fleet_figures(
    result: Result, outcomes: Sequence[dict[str, Any]], pods: Sequence[str]
) -> dict[str, Any]:
    """The worst window but the last (which ends with the load), lanes per client, and the
    clients' lanes per pod."""
    full = result.windows[:-1] if len(result.windows) > 1 else result.windows
    shares = [w["max_share_over_fair"] for w in full if w["max_share_over_fair"] is not None]
    lanes = [o["lanes_max"] for o in outcomes if o.get("lanes_max") is not None]
    figures: dict[str, Any] = {
        "max_window_share_over_fair": max(shares) if shares else None,
        "lanes_per_client_max": max(lanes) if lanes else None,
        "connections_per_pod": None,
        "connections_per_pod_max_over_mean": None,
    }
    for key in ("lanes_moved", "lanes_left_crowded", "dials_redialled_crowded"):
        counts = [o[key] for o in outcomes if o.get(key) is not None]
        figures[key] = sum(counts) if counts else None
    ends = [o["lanes_at_end"] for o in outcomes if o.get("lanes_at_end") is not None]
    if ends:
        per_pod = {pod: 0 for pod in pods}
        for end in ends:
            for pod in end:
                if pod is not None:
                    per_pod[pod] = per_pod.get(pod, 0) + 1
        figures["connections_per_pod"] = per_pod
        figures["connections_per_pod_max_over_mean"] = max_share_over_fair(per_pod, len(pods))
    return figures


RUNNERS: dict[str, Callable[[Settings], list[Result]]] = {
    "slow-pod": slow_pod,
    "hung-pod": hung_pod,
    "fleet": fleet,
}
