"""The fleet simulator against a real multi-process run on the local cluster.

``python scripts/fleet_real_run.py [--runs 3] [--seconds 30] [--clients 8] [--pods 6] [--lanes 4]``

Starts a :class:`~grpc_balance_mw.testing.LocalCluster` of pods with a capacity (4 calls at once,
50 ms each), then ``--clients`` client processes, each with a balanced channel of at most
``--lanes`` lanes making Poisson calls at the rate that loads the pods to 60 %, all starting
together; the pods' own counts give the busiest pod's share over the fair share. Then the
simulator runs the same fleet (fresh clients, no rotation within the run, the subset rule off as
in today's pool) over 40 seeds. Prints one JSON document: each real run's ``max_share_over_fair``,
their median, and the simulator's median and 10th-90th percentiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from grpc_balance_mw.simulate import FleetConfig, simulate
from grpc_balance_mw.testing import LocalCluster

SERVICE_MS = 50.0
CONCURRENCY = 4
LOAD = 0.6

CLIENT = r"""
import random, sys, time
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
target, rate, seconds, lanes, seed = sys.argv[1:6]
rng = random.Random(int(seed))
channel = balanced_channel(target, lanes=int(lanes), max_lanes=int(lanes))
stub = pb_grpc.ChargePointsStub(channel)
stub.GetChargePoint(pb.GetChargePointRequest(id="warm"), timeout=10)
print("ready", flush=True)
sys.stdin.readline()
futures = []
now = time.monotonic()
at, end = now, now + float(seconds)
while at < end and len(futures) < 100_000:
    at += rng.expovariate(float(rate))
    if at - time.monotonic() > 0:
        time.sleep(at - time.monotonic())
    futures.append(stub.GetChargePoint.future(pb.GetChargePointRequest(id="cp"), timeout=30))
errors = sum(1 for future in futures if future.exception() is not None)
print(len(futures), errors, flush=True)
channel.close()
"""


def real_run(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    with LocalCluster(args.pods, service_time_ms=SERVICE_MS, max_concurrent=CONCURRENCY) as cluster:
        command = [sys.executable, "-c", CLIENT, cluster.service_target, str(rate)]
        procs = [
            subprocess.Popen(
                [*command, str(args.seconds), str(args.lanes), str(index)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for index in range(args.clients)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            cluster.reset_counts()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            outcomes = [proc.stdout.readline().split() for proc in procs if proc.stdout]
            for proc in procs:
                proc.wait(timeout=60)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        served = cluster.served()
    fair = sum(served.values()) / args.pods
    return {
        "calls": sum(int(calls) for calls, _ in outcomes),
        "errors": sum(int(errors) for _, errors in outcomes),
        "served": served,
        "max_share_over_fair": round(max(served.values()) / fair, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pods", type=int, default=6)
    parser.add_argument("--lanes", type=int, default=4)
    args = parser.parse_args()
    rate = LOAD * args.pods * CONCURRENCY / (SERVICE_MS / 1000) / args.clients
    runs = [real_run(args, rate) for _ in range(args.runs)]
    simulated = sorted(
        simulate(
            FleetConfig(
                clients=args.clients,
                pods=args.pods,
                lanes=args.lanes,
                seconds=args.seconds,
                seed=seed,
                rate=rate,
                concurrency=CONCURRENCY,
                service_s=SERVICE_MS / 1000,
                rotate_s=None,
                subset_rule=None,
            )
        ).max_share_over_fair
        for seed in range(40)
    )
    real = [run["max_share_over_fair"] for run in runs]
    print(
        json.dumps(
            {
                "real_runs": runs,
                "real_max_share_over_fair": real,
                "real_median": statistics.median(real),
                "simulated_median": statistics.median(simulated),
                "simulated_p10_p90": [simulated[4], simulated[35]],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
