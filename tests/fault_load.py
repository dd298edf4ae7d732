"""What the fault and load tests share: channels of either remedy in either mode, a bounded
concurrent load that can trigger a fault part-way, and outages of the cluster's Service and DNS
on their own ports (the harness has no restart-in-place for them)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from calls import call_aio, call_sync

from grpc_balance_mw import dial_per_request as redial
from grpc_balance_mw.aio import dial_per_request as aio_redial
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.retry import RetryBudget, RetryPolicy, wait_full_jitter
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME
from grpc_balance_mw.testing.dnsmasq import dnsmasq_path
from grpc_balance_mw.testing.process import ChildProcess, python_module

MODES = ("sync", "aio")
REMEDIES = ("balanced", "dial-per-request")
GET = f"/{SERVICE_NAME}/GetChargePoint"
WATCH = f"/{SERVICE_NAME}/WatchStatus"
OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def threads_now() -> set[threading.Thread]:
    """Live threads, grpcio's aio poller aside, after a garbage collection.

    The poller (``_poll_wrapper``) is grpcio's: it starts with the first aio channel object and
    stops with the last one, when the collector frees it (grpcio 1.50 keeps it until the event
    loop ends), so its presence says when gc ran, not what this package left.
    """
    gc.collect()
    return {t for t in threading.enumerate() if not t.name.endswith("(_poll_wrapper)")}


def threads_left(before: set[threading.Thread]) -> list[str]:
    """The names of threads alive now that were not in ``before`` (see ``threads_now``)."""
    return sorted(t.name for t in threads_now() - before)


def retry_policy(
    retryable: bool, *, attempts: int = 5, backoff_s: float = 0.01, reserve_per_s: float = 10.0
) -> RetryPolicy:
    """GetChargePoint and WatchStatus marked idempotent (or nothing), a budget of its own."""
    return RetryPolicy(
        methods={GET, WATCH} if retryable else (),
        max_attempts=attempts,
        backoff=wait_full_jitter(backoff_s / 10, 2.0, backoff_s),
        budget=RetryBudget(min_per_s=reserve_per_s),
    )


def open_channel(mode: str, remedy: str, target: str, **kwargs: Any) -> Any:
    """A channel of ``remedy`` in ``mode`` (aio: call inside the loop that uses it)."""
    if remedy == "balanced":
        make: Any = balanced_channel if mode == "sync" else aio_balanced_channel
    else:
        make = (
            redial.dial_per_request_channel
            if mode == "sync"
            else aio_redial.dial_per_request_channel
        )
    return make(target, **kwargs)


async def close_channel(mode: str, channel: Any) -> None:
    if mode == "sync":
        await asyncio.to_thread(channel.close)
    else:
        await channel.close()


@dataclass(frozen=True)
class Outcome:
    """One call as its caller saw it."""

    code: grpc.StatusCode
    messages: int
    seconds: float


async def load(
    mode: str,
    channel: Any,
    kind: str,
    calls: int,
    concurrency: int,
    *,
    timeout: float = 10.0,
    fault_at: int | None = None,
    fault: Callable[[], None] | None = None,
) -> list[Outcome]:
    """``calls`` calls of ``kind``, ``concurrency`` at a time (threads in sync, tasks in aio);
    ``fault()`` runs (in a thread) once ``fault_at`` calls have ended, while the rest are in
    flight or still to come."""
    finished = 0
    lock = threading.Lock()

    def ended() -> bool:
        nonlocal finished
        with lock:
            finished += 1
            return finished == fault_at

    if mode == "sync":

        def one(_: int) -> Outcome:
            started = time.monotonic()
            seen = call_sync(channel, kind, timeout=timeout)
            outcome = Outcome(seen.code, len(seen.responses), time.monotonic() - started)
            if ended() and fault is not None:
                fault()
            return outcome

        def all_calls() -> list[Outcome]:
            with ThreadPoolExecutor(concurrency) as pool:
                return list(pool.map(one, range(calls)))

        return await asyncio.to_thread(all_calls)

    gate = asyncio.Semaphore(concurrency)

    async def one_aio() -> Outcome:
        async with gate:
            started = time.monotonic()
            seen = await call_aio(channel, kind, timeout=timeout)
            outcome = Outcome(seen.code, len(seen.responses), time.monotonic() - started)
        if ended() and fault is not None:
            await asyncio.to_thread(fault)
        return outcome

    return list(await asyncio.gather(*(one_aio() for _ in range(calls))))


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Whether ``condition`` came true within ``timeout_s`` (the sync twin of :func:`until`)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def count_calls(owner: Any, name: str) -> list[float]:
    """Wrap ``owner.name`` (a method, on this instance only) to note when each call to it
    starts: a negative claim waits for enough of them instead of sleeping."""
    seen: list[float] = []
    method = getattr(owner, name)

    def noted(*args: Any, **kwargs: Any) -> Any:
        seen.append(time.monotonic())
        return method(*args, **kwargs)

    setattr(owner, name, noted)
    return seen


def covered(channel: Any) -> set[str]:
    return {lane.pod for lane in channel.pool.lanes if lane.is_available() and lane.pod}


async def covering(mode: str, channel: Any, pods: int = 3, timeout_s: float = 60.0) -> bool:
    """Whether the lanes come to cover ``pods`` pods, one unary call at a time meanwhile: an
    idle channel rotates no lane by age and its scouts back off (PoolConfig.scout_idle_max_s),
    and the pool's coverage bounds hold for a channel in use. Every call has ended on return,
    so the pods' counts can be reset."""
    deadline = time.monotonic() + timeout_s
    while len(covered(channel)) < pods:
        if time.monotonic() > deadline:
            return False
        if mode == "sync":
            await asyncio.to_thread(call_sync, channel, "unary_unary", timeout=10)
        else:
            await call_aio(channel, "unary_unary", timeout=10)
        await asyncio.sleep(0.05)
    return True


# -- outages of the cluster's parts, on their own ports ----------------------------------------


# The harness has no restart in place for its Service and DNS: these reach into its frontends.


def restart_userspace_service(cluster: LocalCluster, down_s: float) -> None:
    """Stop the embedded L4 Service (every connection through it is cut), keep it down for
    ``down_s``, start it again on the same ``host:port`` with the same endpoints."""
    service = cluster._service
    host, port = service.address.rsplit(":", 1)
    service._child.stop(grace_s=0.0)
    time.sleep(down_s)
    child = ChildProcess(
        python_module("grpc_balance_mw.testing.userspace_proxy", "--listen", f"{host}:{port}"),
        name="service-userspace-restarted",
        log_dir=cluster.workdir,
        control=True,
    )
    service._process = service._child = child
    child.start()
    assert child.wait_ready() == int(port)
    service.update(cluster.endpoints())


@contextlib.contextmanager
def dns_down(cluster: LocalCluster) -> Iterator[None]:
    """dnsmasq stopped while inside, then started again on the same port with the same records."""
    dns = cluster._dns
    dns._process.stop(grace_s=0.0)
    try:
        yield
    finally:
        binary = dnsmasq_path()
        assert binary is not None
        dns._process = ChildProcess(
            dns._argv(binary),
            name="dns-dnsmasq-restarted",
            log_dir=cluster.workdir,
        ).start()
        dns._wait_for(cluster.endpoints())


@contextlib.contextmanager
def hung(cluster: LocalCluster, name: str) -> Iterator[None]:
    """The pod frozen with SIGSTOP: the kernel still accepts its connections, nothing answers.
    SIGCONT when leaving (before anything asks it for its counts)."""
    cluster.pause(name)
    try:
        yield
    finally:
        cluster.resume(name)
