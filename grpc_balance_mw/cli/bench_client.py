"""One client replica of ``bench``'s multi-process scenarios (``slow-pod``, ``fleet``): a process
of its own, so that several clients load the pods as replicas of a Deployment do, each with its
own GIL and its own channel deciding alone.

``python -m grpc_balance_mw.cli.bench_client '<spec as JSON>'`` opens the strategy's channel
(:func:`~grpc_balance_mw.cli.strategies.channel_for`), warms it, prints ``READY 0`` and waits for
``go`` on stdin (answered ``OK``), so every client starts its load together. It then sends
GetChargePoint at a fixed rate, open loop (``future()``: a slow answer does not slow the
arrivals, as with independent users), for ``seconds`` or ``rate * seconds`` calls, waits for the
answers (each within its deadline) and prints one JSON line: every call as ``[sent_s,
latency_ms, pod or null, status name or null]`` (``sent_s`` from ``go``), the most lanes its
pool had, the pods its lanes were on at the end, and its outlier ejections.

The spec: ``{"strategy", "targets": {"service", "l7", "headless"}, "rate", "seconds",
"deadline_s", "phase_s", "pods", "min_lanes", "max_lanes"}`` (the lane bounds: the balanced
strategies' pool; null: the defaults).
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from typing import Any

import grpc

from grpc_balance_mw.cli.strategies import Targets, channel_for, ejections_of, settle
from grpc_balance_mw.pool import LanePool, PoolConfig
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

__all__ = ["main"]

#: Calls one client makes at most, whatever its rate and seconds say.
MAX_CALLS = 100_000
#: Lanes are sampled this often (their count, for the bound on lanes per client).
_SAMPLE_S = 0.25


def pool_config(spec: dict[str, Any]) -> PoolConfig | None:
    if spec.get("max_lanes") is None:
        return None
    return PoolConfig(
        min_lanes=spec.get("min_lanes") or spec["max_lanes"],
        max_lanes=spec["max_lanes"],
        expected_pods=spec.get("pods"),
    )


def lanes_now(pool: LanePool | None) -> list[str | None]:
    """The pods of the lanes that take calls now."""
    if pool is None:
        return []
    return [lane.pod for lane in list(pool.lanes) if lane.is_available()]


def run(spec: dict[str, Any]) -> dict[str, Any]:
    targets = Targets(**spec["targets"])
    channel, _detector = channel_for(
        spec["strategy"], targets, expected_pods=spec.get("pods"), pool_config=pool_config(spec)
    )
    pool = getattr(channel, "pool", None)
    pool = pool if isinstance(pool, LanePool) else None
    try:
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        settle(channel, spec.get("pods") or 3)
        for i in range(10):
            with contextlib.suppress(grpc.RpcError):
                stub.GetChargePoint(pb.GetChargePointRequest(id=f"warm-{i}"), timeout=5)
        print("READY 0", flush=True)
        if sys.stdin.readline().strip() != "go":
            return {}
        print("OK go", flush=True)
        return _load(spec, stub, pool, channel)
    finally:
        channel.close()


def _load(
    spec: dict[str, Any], stub: Any, pool: LanePool | None, channel: grpc.Channel
) -> dict[str, Any]:
    rate, seconds, deadline_s = float(spec["rate"]), float(spec["seconds"]), spec["deadline_s"]
    calls = min(MAX_CALLS, int(rate * seconds))
    rows: list[list[Any]] = []
    lock = threading.Lock()
    lanes_max = len(lanes_now(pool))
    began = time.monotonic()
    next_sample = began
    futures = []
    for i in range(calls):
        at = began + float(spec.get("phase_s", 0.0)) + i / rate
        if at > began + seconds:
            break
        time.sleep(max(0.0, at - time.monotonic()))
        now = time.monotonic()
        if now >= next_sample:
            lanes_max = max(lanes_max, len(lanes_now(pool)))
            next_sample = now + _SAMPLE_S
        sent = time.perf_counter()
        future = stub.GetChargePoint.future(
            pb.GetChargePointRequest(id=f"cp-{i}"), timeout=deadline_s
        )

        def done(future: Any, sent: float = sent, sent_s: float = now - began) -> None:
            latency = (time.perf_counter() - sent) * 1000  # on grpcio's thread: record only
            error = None if future.cancelled() else future.exception()
            if future.cancelled():
                row = [sent_s, latency, None, "CANCELLED"]
            elif error is None:
                row = [sent_s, latency, str(future.result().served_by), None]
            else:
                code = getattr(error, "code", None)
                status = code() if callable(code) else None
                row = [sent_s, latency, None, status.name if status is not None else "UNKNOWN"]
            with lock:
                rows.append(row)

        future.add_done_callback(done)
        futures.append(future)
    for future in futures:
        try:
            future.result(timeout=deadline_s + 10)
        except grpc.FutureTimeoutError:
            future.cancel()
        except grpc.RpcError:
            pass
    ended = time.monotonic() + 5
    while time.monotonic() < ended:  # the callbacks run on grpcio's threads: let them finish
        with lock:
            if len(rows) >= len(futures):
                break
        time.sleep(0.01)
    with lock:
        recorded = sorted(rows)
    return {
        "calls": recorded,
        "unanswered": len(futures) - len(recorded),
        "lanes_max": lanes_max if pool is not None else None,
        "lanes_at_end": lanes_now(pool) if pool is not None else None,
        "lanes_moved": pool.evened if pool is not None else None,
        "lanes_left_crowded": pool.left_crowded if pool is not None else None,
        "dials_redialled_crowded": (pool.crowded - pool.left_crowded if pool is not None else None),
        "ejections": ejections_of(channel),
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    outcome = run(json.loads(args[0]))
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
