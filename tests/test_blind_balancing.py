"""Pods that stamp no identity: the balanced channel balances blind, sync and aio.

Issue 21: behind pods that name themselves nowhere, the channel kept dialling about 4 scouts a
second whose pod it could never learn, and its 3 lanes landed by chance (some runs put every
call on one pod). Now the pool decides it cannot learn pods (``pool.blind``), dials no scout,
keeps 8 lanes and re-rolls the oldest every 0.125 s, and returns to normal once the pods name
themselves. Real pods behind the userspace L4 Service; ground truth from a relay that counts
the connections it accepts and from the pods' own call counts. The re-roll pace and its bound
on open connections are the pure pool's, driven by a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from calls import call_aio, call_sync
from pool_fakes import FakeClock, drive

from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.pool import CheckResult, Lane, LanePool, LanePurpose, PoolConfig
from grpc_balance_mw.testing import LocalCluster

pytestmark = [pytest.mark.cluster]

MODES = ("sync", "aio")
Factory = Callable[..., LocalCluster]
#: Re-rolls counted for the spread: 160 draws of a pod among 3 give a max share over fair
#: above 1.6 with p < 1e-4 (a pod's share over fair has standard deviation sqrt(2 / 160) = 0.11;
#: 0.16 even if the calls spread over the lanes half as evenly as the model assumes).
REROLLS = 160
SPREAD_BOUND = 1.6


class ConnectionCounter:
    """A TCP relay in front of the Service that counts the connections it accepts."""

    def __init__(self, backend: str) -> None:
        host, _, port = backend.rpartition(":")
        self.backend = (host, int(port))
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            upstream = socket.create_connection(self.backend)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                pump = threading.Thread(target=_pump, args=(source, sink), daemon=True)
                self._threads.append(pump)
                pump.start()

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(5)
        self.listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads[1:]:
            thread.join(5)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def unstamped(local_cluster_factory: Factory) -> LocalCluster:
    return local_cluster_factory(pods=3, dns=None, identity_header=None)


@pytest.fixture
def counter(unstamped: LocalCluster) -> Iterator[ConnectionCounter]:
    relay = ConnectionCounter(unstamped.service_target)
    yield relay
    relay.close()


def run(mode: str, target: str, config: PoolConfig, body: Callable[..., Awaitable[None]]) -> None:
    """Open the balanced channel of ``mode`` on ``target`` and run ``body(channel, load)``;
    ``load()`` makes 10 calls in a row (failures are not counted: a pod may be killed)."""

    async def main() -> None:
        if mode == "sync":
            channel: Any = balanced_channel(target, pool_config=config)
        else:
            channel = aio_balanced_channel(target, pool_config=config)

        async def load() -> None:
            if mode == "sync":
                await asyncio.to_thread(
                    lambda: [call_sync(channel, "unary_unary") for _ in "0123456789"]
                )
            else:
                for _ in range(10):
                    await call_aio(channel, "unary_unary")

        try:
            await body(channel, load)
        finally:
            if mode == "sync":
                channel.close()
            else:
                await channel.close()

    asyncio.run(main())


async def until(condition: Callable[[], bool], load: Callable[[], Any], timeout_s: float) -> bool:
    """Whether ``condition`` came true within ``timeout_s``, calls going on meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await load()
    return True


def available(channel: Any) -> list[Any]:
    return [lane for lane in channel.pool.lanes if lane.is_available()]


@pytest.mark.parametrize("mode", MODES)
def test_no_scout_is_dialled_once_the_pool_cannot_learn_pods(
    unstamped: LocalCluster, counter: ConnectionCounter, mode: str
) -> None:
    # Lanes are not re-rolled here, so every connection accepted once blind is a scout.
    config = PoolConfig(blind_reroll_s=None)

    async def body(channel: Any, load: Callable[[], Awaitable[None]]) -> None:
        assert await until(lambda: channel.pool.blind, load, 20), channel
        assert await until(lambda: len(available(channel)) == 8, load, 20), channel
        accepted, served = counter.accepted, sum(unstamped.served().values())
        # A scout was dialled every 0.25 s while calls flowed: 3 s is a dozen of them.
        assert not await until(lambda: counter.accepted > accepted, load, 3.0), (
            f"{counter.accepted - accepted} connections accepted after the pool went blind"
        )
        assert sum(unstamped.served().values()) > served  # calls flowed all along
        assert channel.pool.blind, channel

    run(mode, counter.target, config, body)


@pytest.mark.parametrize("mode", MODES)
def test_blind_lanes_are_rerolled_and_the_pods_shares_even_out(
    unstamped: LocalCluster, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body(channel: Any, load: Callable[[], Awaitable[None]]) -> None:
        pool = channel.pool
        assert await until(lambda: pool.blind and len(available(channel)) == 8, load, 20), pool
        first = {lane.id for lane in available(channel)}
        rerolls, scouts = pool.rerolls, pool.dials - pool.rerolls
        unstamped.reset_counts()
        assert await until(lambda: pool.rerolls - rerolls >= REROLLS, load, 120), pool
        served = unstamped.served()
        # The connections changed: no lane of the start is left, and every dial was a re-roll.
        assert not first & {lane.id for lane in available(channel)}, pool
        assert pool.dials - pool.rerolls == scouts, "a scout or a refill was dialled"
        fair = sum(served.values()) / len(served)
        spread = max(served.values()) / fair
        with capsys.disabled():
            print(
                f"\n{mode}: {pool.rerolls - rerolls} re-rolls, per pod {served}, "
                f"max/fair {spread:.3f}"
            )
        assert spread <= SPREAD_BOUND, served

    run(mode, unstamped.service_target, PoolConfig(), body)


@pytest.mark.parametrize("mode", MODES)
def test_pods_that_start_naming_themselves_end_blind_balancing(
    unstamped: LocalCluster, mode: str
) -> None:
    async def body(channel: Any, load: Callable[[], Awaitable[None]]) -> None:
        pool = channel.pool
        assert await until(lambda: pool.blind, load, 20), pool
        # A rolling update to servers that stamp their pod: 3 new pods, the old ones gone.
        unstamped.settings = dataclasses.replace(unstamped.settings, identity_header=POD_HEADER)
        await asyncio.to_thread(unstamped.scale, 6)
        for name in ("charge-points-0", "charge-points-1", "charge-points-2"):
            await asyncio.to_thread(unstamped.kill, name)
        new = {"charge-points-3", "charge-points-4", "charge-points-5"}

        def normal() -> bool:
            pods = [lane.pod for lane in available(channel)]
            return not pool.blind and len(pods) == 3 and set(pods) == new

        assert await until(normal, load, 30), pool
        scouts = pool.dials
        assert await until(lambda: pool.dials > scouts, load, 10), "scouting did not resume"

    run(mode, unstamped.service_target, PoolConfig(), body)


def unnamed(lane: Lane) -> CheckResult:
    return CheckResult(reachable=True)


def test_blind_rerolls_keep_their_pace_when_rounds_are_further_apart() -> None:
    clock = FakeClock()
    pool = LanePool(PoolConfig(blind_reroll_s=0.125), clock=clock)
    filled = lambda: pool.blind and len([x for x in pool.lanes if x.is_available()]) == 8  # noqa: E731
    assert drive(pool, unnamed, clock, filled, 5) is not None, pool
    scouts, rerolls, began = pool.dials - pool.rerolls, pool.rerolls, clock.now
    drive(pool, unnamed, clock, lambda: False, 30)  # rounds 0.25 s apart, calls between
    pace = (pool.rerolls - rerolls) / (clock.now - began)
    assert 7.5 <= pace <= 8.5, pace
    assert pool.dials - pool.rerolls == scouts  # no scout, no refill
    assert not [lane for lane in pool.lanes if lane.purpose is LanePurpose.SCOUT]


def test_blind_rerolls_wait_while_long_streams_keep_old_lanes_draining() -> None:
    clock = FakeClock()
    pool = LanePool(PoolConfig(blind_reroll_s=0.125, drain_grace_s=600), clock=clock)
    assert drive(pool, unnamed, clock, lambda: pool.blind, 5) is not None, pool
    for _ in range(200):  # streams that never end, on every lane
        drive(pool, unnamed, clock, lambda: True, 0, calls=False)
        pool.acquire()
        clock.advance(0.25)
    draining = [lane for lane in pool.lanes if lane.is_draining()]
    assert len(draining) == 8 and len(pool.lanes) == 16, pool
