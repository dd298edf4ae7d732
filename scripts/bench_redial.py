"""What dial-per-request costs: warm unary latency, plain channel vs a connection per call.

``python scripts/bench_redial.py [--rounds 10] [--calls 200] [--gap-ms 2] [--service] [--aio]``

Pods run as processes of the embedded local cluster (so servers do not share the client's GIL);
the client makes unary calls through three channels, interleaved in rounds so drift in the
machine's speed hits them all alike:

* ``plain``: one warm ``grpc.insecure_channel`` (every call on the same connection);
* ``dial-per-request``: :class:`~grpc_balance_mw.dial_per_request.DialPerRequestChannel`,
  each call dials;
* ``dial-per-request-predial``: the same with ``predial`` connections dialled ahead by its thread.

``--gap-ms`` pauses between calls (not timed), as a real client's calls are spaced; with no gap
the predial thread cannot dial as fast as calls are made and some calls dial inline (the table
says how many were predialled). ``--service`` goes through the L4 Service of 3 pods instead of
straight to one pod, and prints how each channel's calls spread over them.

:func:`run_bench` returns the samples, for ``grpc-balance bench`` to fold in.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import grpc

from grpc_balance_mw.aio.dial_per_request import DialPerRequestChannel as AioDialPerRequestChannel
from grpc_balance_mw.dial_per_request import DialPerRequestChannel
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

STRATEGIES = ("plain", "dial-per-request", "dial-per-request-predial")


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_bench(
    target: str,
    rounds: int,
    calls: int,
    *,
    gap_s: float = 0.002,
    predial: int = 2,
    cluster: LocalCluster | None = None,
) -> dict[str, Any]:
    """Interleaved rounds; returns per-strategy samples (ms), predialled share and spread."""
    plain = grpc.insecure_channel(target)
    redial = DialPerRequestChannel(target, observe=False)
    predialled = DialPerRequestChannel(target, observe=False, predial=predial)
    channels: dict[str, grpc.Channel] = {
        "plain": plain,
        "dial-per-request": redial,
        "dial-per-request-predial": predialled,
    }
    stubs = {name: pb_grpc.ChargePointsStub(channel) for name, channel in channels.items()}
    request = pb.GetChargePointRequest(id="cp-1")
    samples: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    spread: dict[str, dict[str, int]] = {name: {} for name in STRATEGIES}
    clock: Callable[[], float] = time.perf_counter
    try:
        for stub in stubs.values():  # warm up: connections, code paths
            for _ in range(20):
                stub.GetChargePoint(request, timeout=5)
        for _ in range(rounds):
            for name in STRATEGIES:
                if cluster is not None:
                    cluster.reset_counts()
                call = stubs[name].GetChargePoint
                out = samples[name]
                for _ in range(calls):
                    if gap_s:
                        time.sleep(gap_s)
                    started = clock()
                    call(request, timeout=5)
                    out.append((clock() - started) * 1000)
                if cluster is not None:
                    for pod, count in cluster.served().items():
                        spread[name][pod] = spread[name].get(pod, 0) + count
        return {
            "samples": samples,
            "predialled_share": predialled.stats.predialled / max(predialled.stats.dialled, 1),
            "spread": spread,
        }
    finally:
        for channel in channels.values():
            channel.close()


async def run_bench_aio(
    target: str, rounds: int, calls: int, *, gap_s: float = 0.002, predial: int = 2
) -> dict[str, Any]:
    """The same three strategies through ``grpc.aio`` channels (no spread)."""
    plain = grpc.aio.insecure_channel(target)
    redial = AioDialPerRequestChannel(target, observe=False)
    predialled = AioDialPerRequestChannel(target, observe=False, predial=predial)
    channels: dict[str, Any] = {
        "plain": plain,
        "dial-per-request": redial,
        "dial-per-request-predial": predialled,
    }
    stubs = {name: pb_grpc.ChargePointsStub(channel) for name, channel in channels.items()}
    request = pb.GetChargePointRequest(id="cp-1")
    samples: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    clock: Callable[[], float] = time.perf_counter
    try:
        for stub in stubs.values():
            for _ in range(20):
                await stub.GetChargePoint(request, timeout=5)
        for _ in range(rounds):
            for name in STRATEGIES:
                call = stubs[name].GetChargePoint
                out = samples[name]
                for _ in range(calls):
                    if gap_s:
                        await asyncio.sleep(gap_s)
                    started = clock()
                    await call(request, timeout=5)
                    out.append((clock() - started) * 1000)
        share = predialled.stats.predialled / max(predialled.stats.dialled, 1)
        return {"samples": samples, "predialled_share": share, "spread": {}}
    finally:
        for channel in channels.values():
            await channel.close()


def report(result: dict[str, Any]) -> str:
    samples: dict[str, list[float]] = result["samples"]
    plain = statistics.median(samples["plain"])
    lines = [f"{'strategy':<27}{'calls':>7}{'median ms':>11}{'p99 ms':>9}{'vs plain':>10}"]
    for name, values in samples.items():
        ordered = sorted(values)
        median = statistics.median(ordered)
        lines.append(
            f"{name:<27}{len(ordered):>7}{median:>11.3f}{_percentile(ordered, 0.99):>9.3f}"
            f"{median / plain:>9.2f}x"
        )
    lines.append(f"predialled connections used: {result['predialled_share']:.0%} of calls")
    for name, per_pod in result["spread"].items():
        if per_pod:
            lines.append(f"spread {name}: {dict(sorted(per_pod.items()))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200, help="calls per strategy per round")
    parser.add_argument("--gap-ms", type=float, default=2.0, help="pause between calls")
    parser.add_argument("--predial", type=int, default=2)
    parser.add_argument("--service", action="store_true", help="through the L4 Service, 3 pods")
    parser.add_argument("--aio", action="store_true", help="grpc.aio channels instead of sync")
    args = parser.parse_args(argv)
    if not (0 < args.rounds <= 100 and 0 < args.calls <= 5_000 and 0 <= args.gap_ms <= 100):
        parser.error("keep it bounded: --rounds 1..100, --calls 1..5000, --gap-ms 0..100")
    logging.getLogger("grpc_balance_mw").setLevel(logging.ERROR)
    with LocalCluster(pods=3 if args.service else 1, dns=None) as cluster:
        target = cluster.service_target if args.service else cluster.pods[0].address
        started = time.monotonic()
        if args.aio:
            result = asyncio.run(
                run_bench_aio(
                    target, args.rounds, args.calls, gap_s=args.gap_ms / 1000, predial=args.predial
                )
            )
        else:
            result = run_bench(
                target,
                args.rounds,
                args.calls,
                gap_s=args.gap_ms / 1000,
                predial=args.predial,
                cluster=cluster if args.service else None,
            )
        took = time.monotonic() - started
    print(
        f"{'aio' if args.aio else 'sync'} unary calls to {target}, "
        f"{args.rounds} rounds x {args.calls} calls, "
        f"gap {args.gap_ms:g} ms, {took:.1f} s"
    )
    print(report(result))


if __name__ == "__main__":
    main()
