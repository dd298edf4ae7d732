"""Slow start end to end: a pod that a scale-up adds while calls go on gets a share that ramps
up over the window (``Weighted(WeightConfig(slow_start=SlowStart(...)))``), then its full
share; without slow start it gets its full share at once. Ground truth is the pods' own counts
(three pods behind the userspace L4 Service, then a fourth; sync and aio)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from fault_load import close_channel, open_channel
from test_scale_down import calls, lanes_on, until

from grpc_balance_mw.pool.pickers import Weighted
from grpc_balance_mw.pool.pool import JOINED_AFTER_S
from grpc_balance_mw.pool.weights import SlowStart, WeightConfig
from grpc_balance_mw.testing import LocalCluster

pytestmark = [pytest.mark.cluster]

Factory = Callable[..., LocalCluster]
NEW = "charge-points-3"
OLD = {"charge-points-0", "charge-points-1", "charge-points-2"}
WINDOW_S = 8.0
#: Calls counted just after the new pod's lane came: well within its first second, where its
#: weight is slow start's floor (10 %): 0.1 / 3.1 of the calls, 3 %, against a fair 25 %.
EARLY = 300
#: Calls counted once the window is over: 10 runs of 16 per lane of 4 and then some.
LATER = 800


@pytest.mark.parametrize(("mode", "slow_start"), [("sync", True), ("aio", True), ("sync", False)])
def test_a_pod_added_by_a_scale_up_ramps_up_over_the_window(
    local_cluster_factory: Factory, mode: str, slow_start: bool
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None)
    config = WeightConfig(slow_start=SlowStart(window_s=WINDOW_S) if slow_start else None)

    async def main() -> None:
        target = cluster.service_target
        channel = open_channel(mode, "balanced", target, picker=Weighted(config))

        async def load() -> None:
            await calls(mode, channel, 10)

        def new_lane() -> Any:
            lanes = [lane for lane in channel.pool.lanes if lane.is_available()]
            return next((lane for lane in lanes if lane.pod == NEW), None)

        try:
            assert await until(lambda: set(lanes_on(channel)) == OLD, load, 20), channel
            # Only a pod first seen this long after the pool started is slow-started (the
            # pods found at start take full shares from the first call).
            started = min(lane.activated_at for lane in channel.pool.lanes if lane.activated_at)
            ready = started + JOINED_AFTER_S + 0.5
            assert await until(lambda: time.monotonic() > ready, load, 20)
            scale = asyncio.create_task(asyncio.to_thread(cluster.scale, 4))
            while not scale.done():
                await load()
            await scale
            assert await until(lambda: new_lane() is not None, load, 20), channel
            lane = new_lane()
            cluster.reset_counts()
            await calls(mode, channel, EARLY)
            early = cluster.served()
            early_s = time.monotonic() - (lane.joined_at or lane.activated_at)
            fair = EARLY / 4
            print(f"{mode} slow_start={slow_start}: first {EARLY} calls, {early_s:.2f} s", early)
            if not slow_start:
                assert early[NEW] >= 0.6 * fair, early
                return
            assert lane.joined_at is not None, lane
            assert early_s < WINDOW_S / 4, early_s  # else the test's premise is gone
            assert early[NEW] <= 0.4 * fair, early
            # Past the window: the full share.
            done = lane.joined_at + WINDOW_S + 1.5  # and the next weight update
            assert await until(lambda: time.monotonic() > done, load, WINDOW_S + 20)
            cluster.reset_counts()
            await calls(mode, channel, LATER)
            later = cluster.served()
            print(f"{mode}: {LATER} calls after the window", later)
            assert set(later) == OLD | {NEW} and sum(later.values()) == LATER, later
            assert min(later.values()) >= 0.7 * LATER / 4, later
        finally:
            await close_channel(mode, channel)

    asyncio.run(main())
