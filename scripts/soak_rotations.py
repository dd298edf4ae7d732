"""Thousands of lane rotations through the balanced channel: do threads, fds, grpc channel objects
and memory come back to where they started?

``python scripts/soak_rotations.py [--dials 5000] [--mode sync|aio|both]``

Against the embedded local cluster (3 pods, userspace Service). Each round opens a balanced
channel that rotates a lane every 2 calls and scouts every 10 ms (maintenance every 10 ms), makes
calls of every kind until it has dialled ``--dials`` connections in total, and closes it. The
numbers are read after a warm-up channel, and again after the soak (RSS is the process's resident
set, which grpc core's allocator may keep, so it is a ceiling, not a leak figure by itself).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from calls import CALL_KINDS, call_aio, call_sync

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio.balanced import BalancedChannel as AioBalancedChannel
from grpc_balance_mw.aio.balanced import channel_factory as aio_channel_factory
from grpc_balance_mw.balanced import BalancedChannel, channel_factory
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool, PoolConfig, rotate_after_calls
from grpc_balance_mw.testing import LocalCluster


def snapshot() -> dict[str, int]:
    gc.collect()
    kinds = (grpc._channel.Channel, grpc.aio._channel.Channel)
    with open("/proc/self/statm") as statm:
        rss_pages = int(statm.read().split()[1])
    return {
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "channels": sum(isinstance(obj, kinds) for obj in gc.get_objects()),
        "rss_kib": rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
    }


async def soak(mode: str, target: str, dials: int) -> tuple[int, int]:
    """Until ``dials`` connections were dialled; returns (dials, calls)."""
    pool = LanePool(
        PoolConfig(expected_pods=3, scout_interval_s=0.01), rotation=rotate_after_calls(2)
    )
    options = ObserveOptions(registry=AffinityRegistry())
    if mode == "sync":
        channel: Any = BalancedChannel(
            channel_factory(target), target, pool=pool, observe=options, tick_s=0.01
        )
    else:
        channel = AioBalancedChannel(
            aio_channel_factory(target), target, pool=pool, observe=options, tick_s=0.01
        )
    calls = 0
    try:
        while pool.dials < dials:
            kind = CALL_KINDS[calls % 4]
            if mode == "sync":
                seen = await asyncio.to_thread(call_sync, channel, kind)
            else:
                seen = await call_aio(channel, kind)
            if seen.code is not grpc.StatusCode.OK:
                raise SystemExit(f"call {calls} failed: {seen.code}")
            calls += 1
    finally:
        if mode == "sync":
            channel.close()
        else:
            await channel.close()
    return pool.dials, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dials", type=int, default=5000)
    parser.add_argument("--mode", choices=["sync", "aio", "both"], default="both")
    args = parser.parse_args()
    modes = ["sync", "aio"] if args.mode == "both" else [args.mode]
    with LocalCluster(pods=3, dns=None) as cluster:
        for mode in modes:
            asyncio.run(soak(mode, cluster.service_target, 30))  # warm-up
            before = snapshot()
            started = time.monotonic()
            dials, calls = asyncio.run(soak(mode, cluster.service_target, args.dials))
            seconds = time.monotonic() - started
            after = snapshot()
            print(f"{mode}: {dials} dials, {calls} calls in {seconds:.1f} s")
            for key in before:
                print(
                    f"  {key:9} {before[key]:>9} -> {after[key]:>9}  ({after[key] - before[key]:+})"
                )


if __name__ == "__main__":
    main()
