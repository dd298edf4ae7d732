"""omni, calling charge-points: the client change for each way of spreading calls.

    python examples/omni_client.py --mode balanced --target charge-points.ev.svc.cluster.local:80
    python examples/omni_client.py --mode headless \\
        --target charge-points-headless.ev.svc.cluster.local:50051
    python examples/omni_client.py --mode balanced --local-cluster   # try it on this machine

Modes, each a few lines (see ``make_channel``):

* ``observe``: the channel you have, observed: which pod served each call, the affinity alarm in
  the log and in traces. Spreads nothing by itself.
* ``rebalance``: the same, plus a channel factory: calls move onto lanes when the alarm comes.
* ``balanced``: a balanced channel from the start: several connections to distinct pods.
* ``dial-per-request``: every call on a new connection (kube-proxy picks per call), with two
  connections dialled ahead and retries of the idempotent GetChargePoint.
* ``headless``: the proper fix when you can change the cluster: a headless Service + round_robin.

It prints how many calls each pod served, read from the ``x-balance-pod`` response header.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import grpc

from grpc_balance_mw import (
    AffinityTelemetry,
    ObserveOptions,
    Rebalance,
    RetryPolicy,
    balanced_channel,
    dial_per_request_channel,
    headless_channel,
    observe,
)
from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

MODES = ("observe", "rebalance", "balanced", "dial-per-request", "headless")
GET_CHARGE_POINT = "/chargepoints.v1.ChargePoints/GetChargePoint"


def make_channel(mode: str, target: str, expected_pods: int | None) -> grpc.Channel:
    """The client change, per mode (plaintext here; pass grpc.ssl_channel_credentials() for TLS)."""
    # Telemetry logs the affinity warning (and makes spans, if your application set up the SDK).
    options = ObserveOptions(expected_pods=expected_pods, telemetry=AffinityTelemetry())
    if mode == "observe":
        return observe(grpc.insecure_channel(target), options)
    if mode == "rebalance":

        def more_like_mine(extra: Sequence[tuple[str, Any]], interceptors: Any) -> grpc.Channel:
            channel = grpc.insecure_channel(target, options=list(extra))
            return grpc.intercept_channel(channel, *interceptors)

        return observe(grpc.insecure_channel(target), options, rebalance=Rebalance(more_like_mine))
    if mode == "balanced":
        return balanced_channel(target, observe=options)
    if mode == "dial-per-request":
        retry = RetryPolicy(methods={GET_CHARGE_POINT})  # idempotent: safe to send twice
        return dial_per_request_channel(target, retry=retry, predial=2, observe=options)
    if mode == "headless":
        return observe(headless_channel(target), options)
    raise ValueError(f"unknown mode {mode!r}")


def call_pods(channel: grpc.Channel, calls: int) -> Counter[str]:
    """``calls`` GetChargePoint calls; how many each pod served, by its response header."""
    stub = pb_grpc.ChargePointsStub(channel)
    served: Counter[str] = Counter()
    for number in range(calls):
        _, call = stub.GetChargePoint.with_call(
            pb.GetChargePointRequest(id=f"cp-{number}"), timeout=5
        )
        served[dict(call.initial_metadata()).get(POD_HEADER, "unknown")] += 1
    return served


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default="balanced")
    parser.add_argument("--target", help="host:port of charge-points (not with --local-cluster)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--expected-pods", type=int, default=None)
    parser.add_argument(
        "--local-cluster", action="store_true", help="start a 3-pod local cluster and call it"
    )
    args = parser.parse_args(argv)
    if args.local_cluster == (args.target is not None):
        parser.error("give either --target or --local-cluster")
    if not 1 <= args.calls <= 100_000:
        parser.error("--calls must be in 1..100000")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.local_cluster:
        with make_channel(args.mode, args.target, args.expected_pods) as channel:
            served = call_pods(channel, args.calls)
    else:
        from grpc_balance_mw.testing import LocalCluster

        with LocalCluster(pods=3) as cluster:
            target = cluster.headless_target if args.mode == "headless" else cluster.service_target
            with make_channel(args.mode, target, args.expected_pods or 3) as channel:
                served = call_pods(channel, args.calls)
    for pod, count in sorted(served.items()):
        print(f"{pod:24} {count:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
