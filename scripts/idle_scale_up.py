"""A scale-up that happens while balanced channels sit idle: are both new pods served within
5 s of the calls that follow it, and what does an idle channel cost meanwhile?

``python scripts/idle_scale_up.py [--cycles 10] [--channels 5] [--idle-s 60] [--json]``

Against the embedded local cluster (3 pods, HAProxy Service if installed, else userspace).
Each cycle, alternately sync and ``grpc.aio``: ``--channels`` balanced channels with default
options each make one call, then sit idle for ``--idle-s`` (by then their scouting has backed
off all the way, ``PoolConfig.scout_idle_max_s``); the process's CPU over the last 20 s of that
spell is the idle cost. Then the cluster scales 3 -> 5 and every channel makes calls back to
back at once: its figure is the time from the scale-up to the first call that each of the two
new pods served (bound: 20 s). The cluster scales back to 3 after the cycle. One run per
channel per cycle: ``cycles x channels`` runs in all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import threading
import time
from contextlib import ExitStack
from typing import Any

from grpc_balance_mw import balanced_channel
from grpc_balance_mw.aio import balanced_channel as aio_balanced_channel
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

BOUND_S = 20.0  # how long a run waits for the new pods at most
CPU_WINDOW_S = 20.0  # the idle spell's last part, timed
REQUEST = pb.GetChargePointRequest(id="cp-1")


def new_pods(cluster: LocalCluster, before: set[str]) -> set[str]:
    return {pod.name for pod in cluster.pods} - before


def sync_cycle(
    cluster: LocalCluster, channels: int, idle_s: float
) -> tuple[list[float | None], float]:
    with ExitStack() as stack:
        opened = [
            stack.enter_context(balanced_channel(cluster.service_target)) for _ in range(channels)
        ]
        for channel in opened:
            pb_grpc.ChargePointsStub(channel).GetChargePoint(REQUEST, timeout=10)
        time.sleep(max(0.0, idle_s - CPU_WINDOW_S))
        cpu = time.process_time()
        time.sleep(CPU_WINDOW_S)
        idle_ms = (time.process_time() - cpu) / CPU_WINDOW_S * 1000 / channels
        before = {pod.name for pod in cluster.pods}
        cluster.scale(5)
        start = time.monotonic()
        wanted = new_pods(cluster, before)
        took: list[float | None] = [None] * channels

        def calls(index: int, channel: Any) -> None:
            rpc = pb_grpc.ChargePointsStub(channel).GetChargePoint
            seen: set[str] = set()
            while time.monotonic() - start < BOUND_S:
                try:
                    seen.add(str(rpc(REQUEST, timeout=5).served_by))
                except Exception:  # a failed call is not a served one
                    continue
                if wanted <= seen:
                    took[index] = time.monotonic() - start
                    return

        threads = [threading.Thread(target=calls, args=(i, ch)) for i, ch in enumerate(opened)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return took, idle_ms


async def aio_cycle(
    cluster: LocalCluster, channels: int, idle_s: float
) -> tuple[list[float | None], float]:
    opened = [aio_balanced_channel(cluster.service_target) for _ in range(channels)]
    try:
        for channel in opened:
            await pb_grpc.ChargePointsStub(channel).GetChargePoint(REQUEST, timeout=10)
        await asyncio.sleep(max(0.0, idle_s - CPU_WINDOW_S))
        cpu = time.process_time()
        await asyncio.sleep(CPU_WINDOW_S)
        idle_ms = (time.process_time() - cpu) / CPU_WINDOW_S * 1000 / channels
        before = {pod.name for pod in cluster.pods}
        await asyncio.to_thread(cluster.scale, 5)
        start = time.monotonic()
        wanted = new_pods(cluster, before)

        async def calls(channel: Any) -> float | None:
            rpc = pb_grpc.ChargePointsStub(channel).GetChargePoint
            seen: set[str] = set()
            while time.monotonic() - start < BOUND_S:
                try:
                    seen.add(str((await rpc(REQUEST, timeout=5)).served_by))
                except Exception:  # a failed call is not a served one
                    continue
                if wanted <= seen:
                    return time.monotonic() - start
            return None

        took = await asyncio.gather(*(calls(channel) for channel in opened))
        return list(took), idle_ms
    finally:
        await asyncio.gather(*(channel.close() for channel in opened))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--channels", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.cycles <= 100 or not 1 <= args.channels <= 20 or args.idle_s < CPU_WINDOW_S:
        parser.error(f"--cycles 1..100, --channels 1..20, --idle-s >= {CPU_WINDOW_S:g}")
    service = "haproxy" if shutil.which("haproxy") else "userspace"
    runs: dict[str, list[float | None]] = {"sync": [], "aio": []}
    idle: dict[str, list[float]] = {"sync": [], "aio": []}
    with LocalCluster(3, service=service, dns=None) as cluster:
        for cycle in range(args.cycles):
            mode = "sync" if cycle % 2 == 0 else "aio"
            if mode == "sync":
                took, idle_ms = sync_cycle(cluster, args.channels, args.idle_s)
            else:
                took, idle_ms = asyncio.run(aio_cycle(cluster, args.channels, args.idle_s))
            runs[mode] += took
            idle[mode].append(idle_ms)
            cluster.scale(3)
            shown = ", ".join("miss" if t is None else f"{t:.2f}" for t in took)
            print(
                f"cycle {cycle + 1} {mode}: idle {idle_ms:.2f} ms/s per channel; {shown}",
                file=sys.stderr,
            )
    every = [t for mode in runs for t in runs[mode]]
    within = [t for t in every if t is not None and t <= 5.0]
    found = sorted(t for t in every if t is not None)
    summary = {
        "service": service,
        "runs": len(every),
        "within_5_s": len(within),
        "median_s": round(statistics.median(found), 2) if found else None,
        "p95_s": round(found[int(0.95 * (len(found) - 1))], 2) if found else None,
        "max_s": round(found[-1], 2) if found else None,
        "idle_ms_per_s_per_channel": {
            mode: [round(x, 2) for x in values] for mode, values in idle.items()
        },
        "runs_s": {
            mode: [None if t is None else round(t, 2) for t in values]
            for mode, values in runs.items()
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['within_5_s']} of {summary['runs']} runs served both new pods within 5 s; "
            f"median {summary['median_s']} s, p95 {summary['p95_s']} s, max {summary['max_s']} s; "
            f"idle ms/s per channel: {summary['idle_ms_per_s_per_channel']}"
        )
    return 0 if len(within) == len(every) else 1


if __name__ == "__main__":
    sys.exit(main())
