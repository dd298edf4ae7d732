"""A pod that drains (NOT_SERVING, keeps serving, then stops) loses no call of a balanced channel.

Three in-process pods behind the userspace L4 Service; a balanced channel with load on it; one pod
is taken out of the Service and drained, as the kubelet's SIGTERM would. Stopping the server in
the same instant as the health flip fails the calls that reach it afterwards (CANCELLED); a drain
longer than the clients' health-check interval must fail none, without any client retry.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import AioPod, SyncPod
from fault_load import covered, wait_for

from grpc_balance_mw import server as sync_server
from grpc_balance_mw._health import DRAIN_S, GRACE_S
from grpc_balance_mw.aio import server as aio_server
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.pool import PoolConfig
from grpc_balance_mw.pool.health import CHECK_GRACE_S
from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.userspace_proxy import UserspaceService

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

HEALTH_INTERVAL_S = 0.5
DRAIN = {"drain_s": 1.5, "grace_s": 1.0}  # 1.5 s > 0.5 s interval + a check + a tick
MAX_CALLS = 20_000  # per worker: a bound, never reached in the time the test runs
WORKERS = 4


class LoopThread:
    """An event loop in its own thread, for aio pods that outlive one ``asyncio.run``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Pods:
    """Three pods of one flavour (sync or aio servers) with a drain that fits the flavour."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        names = [PodIdentity(f"charge-points-{i}", "127.0.0.1", "ev") for i in range(3)]
        self.loop = LoopThread() if mode == "aio" else None
        if self.loop is None:
            self.pods: list[Any] = [SyncPod(identity) for identity in names]
        else:
            self.pods = [self.loop.run(AioPod(identity).start()) for identity in names]
        self.endpoints = [
            Endpoint(identity.name, "127.0.0.1", pod.port)
            for identity, pod in zip(names, self.pods, strict=True)
        ]

    def drain(self, index: int) -> None:
        pod = self.pods[index]
        if self.loop is None:
            sync_server.drain(pod.server, pod.health, **DRAIN)
        else:
            self.loop.run(aio_server.drain(pod.server, pod.health, **DRAIN))

    def close(self) -> None:
        for pod in self.pods:
            if self.loop is None:
                pod.server.stop(None).wait(10)
            else:
                self.loop.run(pod.server.stop(None))
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "aio"])
def pods(request: pytest.FixtureRequest) -> Iterator[Pods]:
    running = Pods(request.param)
    yield running
    running.close()


@pytest.fixture
def service(tmp_path: Path, pods: Pods) -> Iterator[UserspaceService]:
    proxy = UserspaceService(tmp_path)
    proxy.start(pods.endpoints)
    yield proxy
    proxy.stop()


class Load:
    """Calls on the channel from WORKERS workers until stopped, every status kept."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []
        self.stop = threading.Event()

    def sync(self, channel: grpc.Channel) -> None:
        for _ in range(MAX_CALLS):
            if self.stop.is_set():
                return
            self.codes.append(call_sync(channel, "unary_unary", timeout=5).code)

    async def aio(self, channel: Any) -> None:
        for _ in range(MAX_CALLS):
            if self.stop.is_set():
                return
            self.codes.append((await call_aio(channel, "unary_unary", timeout=5)).code)


def _drain_under_load(pods: Pods, service: UserspaceService, channel: Any, load: Load) -> int:
    """Take pod 1 out of the Service and drain it; return how many calls ended meanwhile."""
    assert wait_for(lambda: len(covered(channel)) == 3), channel
    assert wait_for(lambda: len(load.codes) >= 100), "no load"
    service.update([e for e in pods.endpoints if e.name != "charge-points-1"])
    before = len(load.codes)
    pods.drain(1)
    during = len(load.codes) - before
    assert "charge-points-1" not in covered(channel), channel
    after = len(load.codes)
    assert wait_for(lambda: len(load.codes) >= after + 100), "calls stopped after the drain"
    load.stop.set()
    return during


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_a_draining_pod_loses_no_call(pods: Pods, service: UserspaceService, client: str) -> None:
    config = PoolConfig(expected_pods=3, health_interval_s=HEALTH_INTERVAL_S)
    load = Load()

    def drain_it(channel: Any) -> int:
        return _drain_under_load(pods, service, channel, load)

    if client == "sync":
        channel = balanced_channel(service.address, pool_config=config)
        workers = [threading.Thread(target=load.sync, args=(channel,)) for _ in range(WORKERS)]
        for worker in workers:
            worker.start()
        try:
            during = drain_it(channel)
        finally:
            load.stop.set()
            for worker in workers:
                worker.join(30)
            channel.close()
    else:

        async def main() -> int:
            async with aio_balanced_channel(service.address, pool_config=config) as channel:
                tasks = [asyncio.create_task(load.aio(channel)) for _ in range(WORKERS)]
                try:
                    return await asyncio.to_thread(drain_it, channel)
                finally:
                    load.stop.set()
                    await asyncio.gather(*tasks)

        during = asyncio.run(main())
    lost = [code for code in load.codes if code is not grpc.StatusCode.OK]
    assert lost == [], f"{len(lost)} of {len(load.codes)} calls lost: {set(lost)}"
    assert during >= 50, during  # the load ran through the drain


def test_the_default_drain_outlasts_the_default_health_check_interval() -> None:
    # A client learns of NOT_SERVING at most one interval, one check and one tick later.
    worst = PoolConfig().health_interval_s + 1.0 + CHECK_GRACE_S + 0.25
    assert worst < DRAIN_S
    assert DRAIN_S + GRACE_S < 30  # Kubernetes' default terminationGracePeriodSeconds


@pytest.mark.parametrize("drain", [{"drain_s": -1}, {"grace_s": -0.5}])
def test_a_negative_drain_is_refused(drain: dict[str, float]) -> None:
    pod = SyncPod()
    try:
        with pytest.raises(ConfigurationError, match="drain_s"):
            sync_server.drain(pod.server, pod.health, **drain)
        assert pod.health.serving  # refused before anything changed
    finally:
        pod.server.stop(None).wait(10)


def test_sync_drain_on_signals_drains_then_stops() -> None:
    pod = SyncPod()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stopped = sync_server.drain_on_signals(
            pod.server, pod.health, drain_s=0.5, grace_s=0.5, signals=(signal.SIGUSR1,)
        )
        signal.raise_signal(signal.SIGUSR1)
        assert wait_for(lambda: pod.health.shutting_down, 5)
        with grpc.insecure_channel(pod.target) as channel:  # still serving while draining
            assert call_sync(channel, "unary_unary", timeout=5).code is grpc.StatusCode.OK
        assert stopped.wait(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        pod.server.stop(None).wait(10)


async def test_aio_drain_on_signals_drains_then_stops() -> None:
    pod = await AioPod().start()
    loop = asyncio.get_running_loop()
    try:
        stopped = aio_server.drain_on_signals(
            pod.server, pod.health, drain_s=0.5, grace_s=0.5, signals=(signal.SIGUSR1,)
        )
        signal.raise_signal(signal.SIGUSR1)
        for _ in range(250):
            if pod.health.shutting_down:
                break
            await asyncio.sleep(0.02)
        assert pod.health.shutting_down
        async with grpc.aio.insecure_channel(pod.target) as channel:
            assert (await call_aio(channel, "unary_unary", timeout=5)).code is grpc.StatusCode.OK
        await asyncio.wait_for(stopped, 10)
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        await pod.server.stop(None)
