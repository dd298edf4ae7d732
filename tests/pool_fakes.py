"""Fakes for the pure lane pool: a clock, and a kube-proxy that picks a pod per new connection."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

from grpc_balance_mw.pool import CheckResult, Lane, LanePool, Plan, Signals


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class KubeProxy:
    """Picks a pod at random for every new connection, as iptables' ``statistic`` does."""

    def __init__(self, pods: int, rng: random.Random) -> None:
        self.pods = [f"pod-{i}" for i in range(pods)]
        self.rng = rng
        self.connections: dict[int, str] = {}  # lane id -> pod its connection reached

    def scale(self, pods: int) -> None:
        self.pods = [f"pod-{i}" for i in range(pods)]

    def __call__(self, lane: Lane) -> CheckResult:
        pod = self.connections.setdefault(lane.id, self.rng.choice(self.pods))
        return CheckResult(reachable=True, pod=pod)


def scripted(pods: Iterable[str]) -> Callable[[Lane], CheckResult]:
    """Dials reach these pods, in order; checks of active lanes see the lane's own pod."""
    order: Iterator[str] = iter(pods)

    def check(lane: Lane) -> CheckResult:
        return CheckResult(reachable=True, pod=lane.pod or lane.claimed or next(order))

    return check


def run(
    pool: LanePool,
    check: Callable[[Lane], CheckResult],
    now: float | None = None,
    signals: Signals | None = None,
) -> Plan:
    """One maintenance round as an adapter does it: plan, dial and check, report back, check
    again the lanes whose pod's name needs confirming."""
    plan = pool.plan(now, signals)
    for lane in plan.dial:
        lane.connection = object()
    lanes = [*plan.dial, *plan.check]
    while lanes:
        for lane in lanes:
            pool.checked(lane, check(lane), now)
        lanes = pool.confirmations()
    return plan


def settle(
    pool: LanePool, check: Callable[[Lane], CheckResult], rounds: int = 50, **kwargs: object
) -> int:
    """Run rounds until one dials nothing new; returns the rounds it took."""
    for i in range(rounds):
        plan = run(pool, check, **kwargs)  # type: ignore[arg-type]
        if not plan.dial:
            return i
    raise AssertionError(f"still dialling after {rounds} rounds: {pool!r}")


def active_pods(pool: LanePool) -> list[str | None]:
    return sorted((lane.pod for lane in pool.lanes if lane.is_available()), key=str)


def call(pool: LanePool) -> None:
    """One call on the pool, if it has a lane."""
    if any(lane.connection is not None for lane in pool.lanes):
        pool.release(pool.acquire())


def drive(
    pool: LanePool,
    check: Callable[[Lane], CheckResult],
    clock: FakeClock,
    until: Callable[[], bool],
    seconds: float,
    *,
    tick_s: float = 0.25,
    round_s: float = 0.005,
    calls: bool = True,
) -> float | None:
    """Maintenance rounds as the channels' threads run them: back to back after a round that
    dialled (at most 16 in a row, ``round_s`` each), else one per ``tick_s``; with ``calls``, a
    call is made before each (a channel in use: an idle one scouts slower). Returns the
    seconds until ``until()`` held, None if not within ``seconds``."""
    began, busy = clock.now, 0
    while clock.now - began <= seconds:
        if calls:
            call(pool)
        plan = run(pool, check)
        if until():
            return clock.now - began
        busy = busy + 1 if plan.dial and busy < 16 else 0
        clock.advance(round_s if busy else tick_s)
    return None
