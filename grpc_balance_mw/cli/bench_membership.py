"""``grpc-balance bench``'s membership scenarios: what the package learns of the pods behind a
target when it is told nothing (issue 21). Each strategy gets a cluster of its own (3 pods), so
the pods' counts are its calls alone, and is opened with default options: no ``expected_pods``,
no probe or rebalance tuning. Besides the sync strategies, ``--strategy aio-interceptors`` and
``--strategy aio-balanced`` run the ``grpc.aio`` forms (:mod:`grpc_balance_mw.cli.aio_strategies`)
through the same loops.

* ``client-ip``: kube-proxy's iptables Service with ``sessionAffinity: ClientIP`` (root and
  network namespaces; every entry is left out with a note where they are missing). Calls at 50/s
  for ``--client-ip-s`` (20 s). Beside the common fields:

  - ``named_after_s``: seconds from the channel's first call to the package naming ClientIP
    (null: not within the run): the pool stuck on ``session-affinity`` or
    ``one-pod-or-client-ip``, or the detector's cause ``same_pod_every_connection`` or
    ``one_pod_or_client_ip`` (with no pod but one ever seen, nothing a client sees tells
    ClientIP from one pod: that cause says both);
    ``named_by``: ``"pool"`` or ``"detector"``; ``named_cause``: the cause's name;
    ``named_after_calls``: calls made by then;
  - ``connections_dialled``: fresh connections the balanced channel's pool dialled over the run
    (null for strategies without a pool); ``connections_when_named``: of those, by the time
    ClientIP was named; ``last_dial_s``: when the last one was dialled (redialling stopped if
    that is well before the run's end);
  - ``cause``: the detector's cause at the end (null without a detector or a cause);
  - ``windows`` (5 s from the first call) and ``per_pod``: the pods' own counts.

* ``unidentified``: pods that stamp no identity header (``LocalCluster(identity_header=None)``).
  Calls at 50/s for twice ``--long-window-s`` (60 s). ``windows``: 5 s each from the pods' own
  counts, times from the first call; ``long_windows``: the same counts over every span of
  ``--long-window-s`` (one starting at each 5 s window), and ``max_long_window_share``: the
  largest max share over fair among them. ``unidentified_call``: the call after which the
  detector first said ``unidentified`` (null: never); ``connections_dialled``: fresh connections
  the balanced channel's pool dialled over the run (none of them can learn its pod: every
  connection beyond the lanes kept is a scout or a re-roll it could not use) and
  ``lanes_rotated``: of those, lanes replaced by rotation.

* ``defaults``: ``DEFAULTS_CALLS`` (300) back-to-back calls per strategy from its first one,
  on the L4 kind of ``--l4``; ``interceptors`` (and ``aio-interceptors``) runs a second time as
  variant ``rebalance``: ``observe(channel, rebalance=Rebalance(channel_factory(target)))``.
  ``alarm_call``: the call after which the detector first raised an alarm (pinned or skewed;
  null: none within the calls) and ``alarm_state`` that state; ``rebalanced_call`` (variant
  ``rebalance``): the call after which the calls had moved onto lanes; ``other_pod_call``: the
  first call a pod other than the first call's served. ``per_pod`` and
  ``max_share_over_fair``: every call, by the pods' counts; ``windows``: 5 s from the first
  call, by the pod each response names.

Every loop is bounded in calls and in time: each strategy's run has a fixed length, the
scenario's length is that times the strategies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.affinity.advice import Cause
from grpc_balance_mw.aio import BalancedChannel as AioBalancedChannel
from grpc_balance_mw.balanced import BalancedChannel, channel_factory
from grpc_balance_mw.cli.aio_strategies import AIO_STRATEGIES, open_aio_strategy
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.cli.bench import (
    PODS,
    SCENARIO_LIMIT_S,
    WINDOW_S,
    Load,
    PodCounts,
    Settings,
    _in_order,
    cluster_parts,
    sliding_windows,
    windows_of,
)
from grpc_balance_mw.cli.strategies import (
    MAX_AGE_S,
    OWN_CONNECTION,
    Opened,
    Result,
    max_share_over_fair,
    open_strategy,
    unavailable_strategies,
)
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

__all__ = ["RUNNERS", "client_ip", "defaults", "unidentified"]

CLIENT_IP_RATE = 50.0
UNIDENTIFIED_RATE = 50.0
DEFAULTS_CALLS = 300
#: How often the client-ip scenario looks at the pool and the detector.
WATCH_S = 0.05
#: The detector's causes that name ClientIP affinity.
CLIENT_IP_CAUSES = frozenset({Cause.CLIENT_IP.value, Cause.ONE_POD_OR_CLIENT_IP.value})


@contextlib.contextmanager
def alone(
    scenario: str, name: str, parts: dict[str, Any], *, rebalance: bool = False
) -> Iterator[Opened | Result]:
    """One strategy with default options on a 3-pod cluster of its own, or the entry saying
    why it was left out."""
    aged = name == "server-max-age"
    if aged:
        parts = {**parts, "dns": None, "l7": None, "max_connection_age_s": MAX_AGE_S}
    with LocalCluster(PODS, **parts) as cluster:
        unavailable = unavailable_strategies(cluster)
        if name in unavailable:
            yield Result(scenario, name, note=f"left out: {unavailable[name]}")
            return
        if name in AIO_STRATEGIES:
            strategy = open_aio_strategy(name, cluster, rebalance=rebalance)
        elif rebalance:
            strategy = rebalancing(cluster)
        else:
            strategy = open_strategy(
                name, cluster, max_age_cluster=cluster if aged else None, expected_pods=None
            )
        try:
            yield strategy
        finally:
            strategy.close()


def rebalancing(cluster: LocalCluster) -> Opened:
    """A plain channel observed with default options and ``Rebalance`` (its defaults)."""
    target = cluster.service_target
    observed = observe(
        grpc.insecure_channel(target, options=[OWN_CONNECTION]),
        ObserveOptions(registry=AffinityRegistry()),
        rebalance=Rebalance(channel_factory(target)),
    )
    stub = pb_grpc.ChargePointsStub(observed)  # type: ignore[no-untyped-call]
    return Opened("interceptors", observed, stub, cluster, observed.detector, observed.close)


def pool_of(strategy: Opened) -> LanePool | None:
    """The balanced channel's pool, for the strategies that have one."""
    channel: Any = strategy.channel
    return channel.pool if isinstance(channel, (BalancedChannel, AioBalancedChannel)) else None


def cause_of(strategy: Opened) -> str | None:
    return strategy.detector.snapshot().cause if strategy.detector is not None else None


def naming(strategy: Opened, pool: LanePool | None) -> tuple[str, str] | None:
    """(who, cause) if the pool or the detector names ClientIP affinity now."""
    if pool is not None and pool.stuck is not None and pool.stuck.cause != "l7-proxy":
        return "pool", pool.stuck.cause
    cause = cause_of(strategy)
    if cause in CLIENT_IP_CAUSES:
        return "detector", str(cause)
    return None


def _left_out(scenario: str, settings: Settings, missing: list[str]) -> list[Result]:
    note = f"left out: {'; '.join(missing)}"
    progress(f"{scenario}: {note}")
    return [Result(scenario, name, note=note) for name in settings.strategies]


# -- client-ip --------------------------------------------------------------------------------


def client_ip(settings: Settings) -> list[Result]:
    missing = missing_components(service="iptables")
    if missing:
        return _left_out("client-ip", settings, missing)
    return _in_order([_client_ip(settings, name) for name in settings.strategies], settings)


def _client_ip(settings: Settings, name: str) -> Result:
    parts = {**cluster_parts("iptables"), "session_affinity": "ClientIP"}
    progress(f"client-ip: {name}")
    with alone("client-ip", name, parts) as strategy:
        if isinstance(strategy, Result):
            return strategy
        pool = pool_of(strategy)
        figures: dict[str, Any] = {
            "named_after_s": None,
            "named_by": None,
            "named_cause": None,
            "named_after_calls": None,
            "connections_dialled": None,
            "connections_when_named": None,
            "last_dial_s": None,
        }
        dials = 0
        budget = int(settings.client_ip_s * CLIENT_IP_RATE) + 1
        load = Load([strategy], "client-ip", rate=CLIENT_IP_RATE, workers=1, budget=budget)
        result = load.results[name]
        counts = PodCounts(strategy.cluster, time.monotonic())
        with load:
            began = counts.event_at = time.monotonic()
            read_at = began + WINDOW_S
            while (now := time.monotonic()) < began + settings.client_ip_s:
                if now >= read_at:
                    counts.read(PODS)
                    read_at += WINDOW_S
                if figures["named_after_s"] is None and (named := naming(strategy, pool)):
                    figures.update(
                        named_after_s=round(now - began, 3),
                        named_by=named[0],
                        named_cause=named[1],
                        named_after_calls=result.calls,
                        connections_when_named=pool.dials if pool is not None else None,
                    )
                if pool is not None and pool.dials != dials:
                    dials, figures["last_dial_s"] = pool.dials, round(now - began, 3)
                load.wait(WATCH_S)
        figures["connections_dialled"] = pool.dials if pool is not None else None
        figures["cause"] = cause_of(strategy)
        counts.read(PODS)
        (result,) = load.finish(
            PODS,
            f"sessionAffinity ClientIP, default options, {CLIENT_IP_RATE:g} calls/s for "
            f"{settings.client_ip_s:g} s; per_pod: the pods' counts",
        )
    result.windows = counts.windows
    result.per_pod = counts.since(0.0)
    result.max_share_over_fair = max_share_over_fair(result.per_pod, PODS)
    result.figures = figures
    return result


# -- unidentified ------------------------------------------------------------------------------


def unidentified(settings: Settings) -> list[Result]:
    results = [_unidentified(settings, name) for name in settings.strategies]
    return _in_order(results, settings)


def _unidentified(settings: Settings, name: str) -> Result:
    parts = {**cluster_parts(settings.l4), "identity_header": None}
    run_s = 2 * settings.long_window_s
    progress(f"unidentified: {name} for {run_s:g} s")
    with alone("unidentified", name, parts) as strategy:
        if isinstance(strategy, Result):
            return strategy
        pool = pool_of(strategy)
        detector = strategy.detector
        named: list[int] = []

        def on_pod(result: Result, _pod: str) -> None:  # under the load's lock
            if named or detector is None:
                return
            if detector.state is AffinityState.UNIDENTIFIED:
                named.append(result.calls)

        budget = int(run_s * UNIDENTIFIED_RATE) + 1
        load = Load(
            [strategy], "unidentified", rate=UNIDENTIFIED_RATE, workers=1, budget=budget,
            on_pod=on_pod,
        )  # fmt: skip
        counts = PodCounts(strategy.cluster, time.monotonic())
        with load:
            counts.event_at = time.monotonic()
            for i in range(1, round(run_s / WINDOW_S) + 1):
                load.wait(max(0.0, counts.event_at + i * WINDOW_S - time.monotonic()))
                if i < round(run_s / WINDOW_S):
                    counts.read(PODS)
        counts.read(PODS)  # the last window once the load stopped: every call is in one
        (result,) = load.finish(
            PODS,
            f"pods that stamp no identity, default options, {UNIDENTIFIED_RATE:g} calls/s for "
            f"{run_s:g} s; spread: the pods' counts",
        )
        result.figures = {
            "unidentified_call": named[0] if named else None,
            "connections_dialled": pool.dials if pool is not None else None,
            "lanes_rotated": pool.rotations if pool is not None else None,
            "cause": cause_of(strategy),
        }
    result.windows = counts.windows
    result.per_pod = counts.since(0.0)
    result.max_share_over_fair = max_share_over_fair(result.per_pod, PODS)
    long = sliding_windows(counts.windows, settings.long_window_s, PODS)
    shares = [w["max_share_over_fair"] for w in long if w["max_share_over_fair"] is not None]
    result.figures["long_windows"] = long
    result.figures["max_long_window_share"] = max(shares) if shares else None
    return result


# -- defaults ----------------------------------------------------------------------------------


def defaults(settings: Settings) -> list[Result]:
    results = []
    for name in settings.strategies:
        results.append(_defaults(settings, name))
        if name in ("interceptors", "aio-interceptors"):
            results.append(_defaults(settings, name, rebalance=True))
    return _in_order(results, settings)


def _defaults(settings: Settings, name: str, *, rebalance: bool = False) -> Result:
    variant = "rebalance" if rebalance else None
    progress(f"defaults: {name}{' (rebalance)' if rebalance else ''}")
    with alone("defaults", name, cluster_parts(settings.l4), rebalance=rebalance) as strategy:
        if isinstance(strategy, Result):
            strategy.variant = variant
            return strategy
        result = Result("defaults", name, variant=variant)
        figures: dict[str, Any] = {"alarm_call": None, "alarm_state": None, "other_pod_call": None}
        if rebalance:
            figures["rebalanced_call"] = None
        rebalancer = getattr(strategy.channel, "rebalancer", None)
        samples: list[tuple[float, str]] = []
        latencies: list[float] = []
        strategy.cluster.reset_counts()
        began = time.monotonic()
        first_pod = None
        for call in range(1, DEFAULTS_CALLS + 1):
            if time.monotonic() > began + SCENARIO_LIMIT_S:
                break
            started = time.perf_counter()
            result.calls += 1
            try:
                pod = strategy.get(f"cp-{call}")
            except grpc.RpcError as error:
                code = getattr(error, "code", None)
                result.failed(code() if callable(code) else None)
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            samples.append((time.monotonic() - began, pod))
            first_pod = first_pod or pod
            if figures["other_pod_call"] is None and pod != first_pod:
                figures["other_pod_call"] = call
            state = strategy.detector.state if strategy.detector is not None else None
            if figures["alarm_call"] is None and state is not None and state.is_alarm:
                figures.update(alarm_call=call, alarm_state=state.value)
            moved = rebalancer is not None and rebalancer.balanced is not None
            if rebalance and figures["rebalanced_call"] is None and moved:
                figures["rebalanced_call"] = call
        result.count(strategy.cluster.served())
        strategy.report(result)
        figures["cause"] = cause_of(strategy)
        result.note = f"{DEFAULTS_CALLS} back-to-back calls with default options" + (
            "; observe(rebalance=Rebalance(factory))" if rebalance else ""
        )
    result.finish(latencies, PODS)
    result.windows = windows_of(samples, lambda _start: PODS)
    result.figures = figures
    return result


RUNNERS: dict[str, Callable[[Settings], list[Result]]] = {
    "client-ip": client_ip,
    "unidentified": unidentified,
    "defaults": defaults,
}
