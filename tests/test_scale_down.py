"""After a scale-down (4 -> 3 pods) the balanced channel's calls spread evenly over the pods left.

Before the membership model, the pool kept as many lanes as pods the affinity detector had seen
within its 600 s TTL: the lane that had reached the leaving pod reconnected to a pod another
lane covered, and that pod carried twice its share for ten minutes. Ground truth is the pods'
own counts; sync and aio, a graceful scale-down and a SIGKILL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from calls import call_aio, call_sync

from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.testing import LocalCluster

pytestmark = [pytest.mark.cluster]

Factory = Callable[..., LocalCluster]
LEAVING = "charge-points-3"
LEFT = {"charge-points-0", "charge-points-1", "charge-points-2"}
#: Calls counted: 10 runs of 16 per lane of 3 (LeastOutstanding's sequential runs).
WINDOW = 480


async def calls(mode: str, channel: Any, count: int) -> None:
    """``count`` unary calls in a row; failures (a pod killed mid-call) are not counted."""
    if mode == "sync":
        await asyncio.to_thread(lambda: [call_sync(channel, "unary_unary") for _ in range(count)])
    else:
        for _ in range(count):
            await call_aio(channel, "unary_unary")


async def until(condition: Callable[[], bool], load: Callable[[], Any], timeout_s: float) -> bool:
    """Wait (with calls going on, as an application's would) until ``condition``, at most
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await load()
    return True


def lanes_on(channel: Any) -> list[str]:
    return sorted(lane.pod or "?" for lane in channel.pool.lanes if lane.is_available())


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.parametrize("how", ["graceful", "sigkill"])
def test_after_a_scale_down_the_pods_left_get_even_shares(
    local_cluster_factory: Factory, mode: str, how: str
) -> None:
    cluster = local_cluster_factory(pods=4, dns=None)

    async def main() -> None:
        if mode == "sync":
            channel: Any = balanced_channel(cluster.service_target)
        else:
            channel = aio_balanced_channel(cluster.service_target)

        async def load() -> None:
            await calls(mode, channel, 10)

        try:
            assert await until(lambda: len(set(lanes_on(channel))) == 4, load, 20), channel
            if how == "graceful":
                event = asyncio.create_task(asyncio.to_thread(cluster.scale, 3))
            else:
                event = asyncio.create_task(asyncio.to_thread(cluster.kill, LEAVING))
            while not event.done():
                await load()
            await event
            # The leaving pod is dropped on evidence, and its lane's slot goes with it.
            assert await until(lambda: set(lanes_on(channel)) == LEFT, load, 20), channel
            dropped = await until(lambda: len(lanes_on(channel)) == 3, load, 20)
            cluster.reset_counts()
            await calls(mode, channel, WINDOW)
            served = {pod: count for pod, count in cluster.served().items() if pod in LEFT}
            fair = sum(served.values()) / len(LEFT)
            assert sum(served.values()) == WINDOW, served
            assert max(served.values()) / fair <= 1.2, (served, dropped, channel)
        finally:
            if mode == "sync":
                channel.close()
            else:
                await channel.close()

    asyncio.run(main())
