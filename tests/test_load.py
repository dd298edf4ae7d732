"""Load through the balanced channel while it rotates: 32 threads (sync), 500 tasks (aio), every
call kind, for a bounded time; what the client counted reconciles exactly with what the pods
counted. Then rotations by the hundred leave no thread, fd or channel object behind (thousands:
``scripts/soak_rotations.py``, outside the suite).

Slow: marked ``slow`` (a few seconds of full load each).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc._channel  # not imported by `import grpc` until a sync channel is made
import grpc.aio
import pytest
from calls import CALL_KINDS, call_aio, call_sync
from conftest import require
from fault_load import (
    MODES,
    OK,
    close_channel,
    covering,
    open_channel,
    threads_left,
    threads_now,
)

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio.balanced import BalancedChannel as AioBalancedChannel
from grpc_balance_mw.aio.balanced import channel_factory as aio_channel_factory
from grpc_balance_mw.balanced import BalancedChannel, channel_factory
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool, PoolConfig, rotate_after_age, rotate_after_calls
from grpc_balance_mw.testing import LocalCluster, missing_components

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.leaks_per_module(
        reason="the module's cluster opens its pods' admin connections when first asked"
    ),
]

SECONDS = 3.0
MAX_CALLS = 20_000  # per run: the time bound ends it first on this machine


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        yield running


async def hammer(mode: str, channel: Any, workers: int) -> Counter[str]:
    """``workers`` callers, each cycling through the call kinds until the time or count bound;
    returns the status names seen, by kind."""
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + SECONDS
    budget = iter(range(MAX_CALLS))

    def take() -> bool:
        with lock:
            return next(budget, None) is not None and time.monotonic() < end

    def record(kind: str, code: grpc.StatusCode) -> None:
        with lock:
            seen[f"{kind} {code.name}"] += 1

    if mode == "sync":

        def worker(index: int) -> None:
            n = index
            while take():
                kind = CALL_KINDS[n % 4]
                record(kind, call_sync(channel, kind, timeout=10).code)
                n += 1

        def run_all() -> None:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(worker, range(workers)))

        await asyncio.to_thread(run_all)
        return seen

    async def task(index: int) -> None:
        n = index
        while take():
            kind = CALL_KINDS[n % 4]
            record(kind, (await call_aio(channel, kind, timeout=10)).code)
            n += 1

    await asyncio.gather(*(task(i) for i in range(workers)))
    return seen


@pytest.mark.parametrize(("mode", "workers"), [("sync", 32), ("aio", 500)])
def test_counts_reconcile_exactly_under_load_while_lanes_rotate(
    cluster: LocalCluster, mode: str, workers: int
) -> None:
    async def main() -> tuple[Counter[str], int, str]:
        channel = open_channel(
            mode, "balanced", cluster.service_target,
            rotation=rotate_after_age(0.3),
            pool_config=PoolConfig(expected_pods=3, scout_interval_s=None),
            observe=ObserveOptions(expected_pods=3, registry=AffinityRegistry()),
        )  # fmt: skip
        try:
            assert await covering(mode, channel), channel
            cluster.reset_counts()
            seen = await hammer(mode, channel, workers)
            return seen, channel.pool.rotations, repr(channel)
        finally:
            await close_channel(mode, channel)

    seen, rotations, summary = asyncio.run(main())
    calls = sum(seen.values())
    assert all(key.endswith(" OK") for key in seen), seen
    assert {key.split()[0] for key in seen} == set(CALL_KINDS)
    assert rotations >= 5, summary  # lanes lived 0.24-0.36 s each
    served = cluster.served()
    assert sum(served.values()) == calls, (served, seen)  # none lost, none sent twice
    assert all(served.values()), served


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _channels() -> int:
    """grpc channel objects alive in this process (sync and aio)."""
    gc.collect()
    kinds = (grpc._channel.Channel, grpc.aio._channel.Channel)
    return sum(isinstance(obj, kinds) for obj in gc.get_objects())


@pytest.mark.parametrize("mode", MODES)
def test_hundreds_of_rotations_leave_nothing_behind(cluster: LocalCluster, mode: str) -> None:
    async def churn(dials: int) -> int:
        """Calls until the channel has dialled ``dials`` connections (at most 3,000 calls)."""
        # Maintenance every 10 ms (not 250): a rotation and a scout per lane and tick.
        pool = LanePool(
            PoolConfig(expected_pods=3, scout_interval_s=0.01), rotation=rotate_after_calls(2)
        )
        target = cluster.service_target
        options = ObserveOptions(registry=AffinityRegistry())
        if mode == "sync":
            channel: Any = BalancedChannel(
                channel_factory(target), target, pool=pool, observe=options, tick_s=0.01
            )
        else:
            channel = AioBalancedChannel(
                aio_channel_factory(target), target, pool=pool, observe=options, tick_s=0.01
            )
        try:
            for n in range(3000):
                if pool.dials >= dials:
                    break
                kind = CALL_KINDS[n % 4]
                if mode == "sync":
                    code = (await asyncio.to_thread(call_sync, channel, kind)).code
                else:
                    code = (await call_aio(channel, kind)).code
                assert code is OK
            return int(channel.pool.dials)
        finally:
            await close_channel(mode, channel)

    asyncio.run(churn(40))  # warm grpc up: its own threads and pollers start once
    channels, threads, fds = _channels(), threads_now(), _fds()
    dials = asyncio.run(churn(300))
    assert dials >= 300  # rotations every 2 calls per lane, scouts every 10 ms
    assert not [t for t in threading.enumerate() if t.name.startswith("balanced-channel")]
    assert _channels() <= channels, (channels, _channels())
    assert not threads_left(threads)
    # grpc core releases a closed connection's socket on its own thread, a moment later: wait
    # for that (bounded); a leak would not come back (3,000 dials in the soak script: +0).
    deadline = time.monotonic() + 5
    while _fds() > fds + 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fds() <= fds + 4, (fds, _fds())
