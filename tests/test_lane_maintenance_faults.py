"""A balanced channel's maintenance survives faults in a round, sync and aio, on a real pod: a lane
factory that raises once, a health check that outlives its bound. Each lane handed out must be
reported to the pool whatever failed, or it stays CHECKING and the pool dials nothing again."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import SyncPod
from fault_load import until
from leak_fixtures import server_with_own_workers

from grpc_balance_mw.aio.balanced import BalancedChannel as AioBalancedChannel
from grpc_balance_mw.aio.balanced import channel_factory as aio_channel_factory
from grpc_balance_mw.balanced import BalancedChannel, channel_factory
from grpc_balance_mw.health_check import CHECK_METHOD
from grpc_balance_mw.pool import LanePool, PoolConfig, rotate_never

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

MODES = ("sync", "aio")


def lane_pool() -> LanePool:
    """One lane, a scout every 50 ms: each scout is one more call of the lane factory."""
    return LanePool(
        PoolConfig(min_lanes=1, max_lanes=1, scout_interval_s=0.05), rotation=rotate_never()
    )


class FlakyFactory:
    """Makes lanes' channels to ``target``; its ``fail_on``-th call raises (a certificate file
    read while it is being rotated)."""

    def __init__(self, target: str, fail_on: int) -> None:
        self.calls = 0
        self.fail_on = fail_on
        self._sync = channel_factory(target)
        self._aio = aio_channel_factory(target)

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise OSError("tls.crt: No such file or directory (being rotated)")

    def sync(self, extra: Any) -> grpc.Channel:
        self._count()
        return self._sync(extra)

    def aio(self, extra: Any, interceptors: Any) -> grpc.aio.Channel:
        self._count()
        return self._aio(extra, interceptors)


def wedged(pool: LanePool) -> list[Any]:
    """Lanes handed out for a check that never came back: pending with no connection."""
    return [lane for lane in pool.lanes if lane.is_pending() and lane.connection is None]


@pytest.mark.parametrize("mode", MODES)
def test_a_lane_factory_that_raises_once_does_not_wedge_the_pool(
    sync_pod: SyncPod, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    factory = FlakyFactory(sync_pod.target, fail_on=2)  # the first lane works, the next raises

    async def main() -> None:
        if mode == "sync":
            channel: Any = BalancedChannel(
                factory.sync, sync_pod.target, pool=lane_pool(), observe=False
            )
        else:
            channel = AioBalancedChannel(
                factory.aio, sync_pod.target, pool=lane_pool(), observe=False
            )
        try:
            # Scouting goes on after the failed dial: more lanes are made, none is left pending.
            healed = await until(lambda: factory.calls >= 5)
            assert healed, (channel, factory.calls)
            assert not wedged(channel.pool), channel
            seen = (
                await asyncio.to_thread(call_sync, channel, "unary_unary")
                if mode == "sync"
                else await call_aio(channel, "unary_unary")
            )
            assert seen.code is grpc.StatusCode.OK
        finally:
            if mode == "sync":
                await asyncio.to_thread(channel.close)
            else:
                await channel.close()

    with caplog.at_level(logging.DEBUG, logger="grpc_balance_mw"):
        asyncio.run(main())
    faults = [r for r in caplog.records if "could not open or check it: OSError" in r.message]
    assert len(faults) == 1, faults
    assert faults[0].levelno == logging.WARNING and faults[0].exc_info is not None


# -- a check that outlives its bound (aio: asyncio.wait_for's own timeout) ------------------


@pytest.fixture
def hanging_health() -> Iterator[str]:
    """A server whose ``Health/Check`` answers only when the test ends."""
    release = threading.Event()

    def check(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        release.wait(30)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server = server_with_own_workers(16)
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        release.set()
        server.stop(None).wait()


class _NoCheckDeadline(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends the health check without its deadline: the check then outlives the channel's
    bound on it (``check_timeout_s`` + grace), as with a gRPC core that never fires it."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method in (CHECK_METHOD, CHECK_METHOD.encode()):
            details = grpc.aio.ClientCallDetails(
                details.method, None, details.metadata, details.credentials,
                details.wait_for_ready,
            )  # fmt: skip
        return await continuation(details, request)


async def test_a_check_past_its_bound_counts_as_unreached_and_the_pool_goes_on(
    hanging_health: str,
) -> None:
    """On Python 3.10 ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, which is not the
    builtin ``TimeoutError`` there: uncaught, it failed the whole round, every lane of it stayed
    CHECKING, and the pool dialled nothing again."""
    made = aio_channel_factory(hanging_health)
    dials = 0

    def factory(extra: Any, interceptors: Any) -> grpc.aio.Channel:
        nonlocal dials
        dials += 1
        return made(extra, [_NoCheckDeadline(), *interceptors])

    pool = LanePool(PoolConfig(min_lanes=1, max_lanes=1, scout_interval_s=None))
    channel = AioBalancedChannel(
        factory, hanging_health, pool=pool, observe=False, check_timeout_s=0.1, tick_s=0.05
    )
    try:
        # Each unreached lane is retired and redialled (with backoff): dials go on.
        assert await until(lambda: dials >= 3), (channel, dials)
        assert pool.dials >= 3 and not [lane for lane in pool.lanes if lane.is_available()]
    finally:
        await channel.close()
