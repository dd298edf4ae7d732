"""A charge-points pod, wired the way a real service adds grpc_balance_mw's server half.

    python examples/charge_points_server.py --pod-name charge-points-0 --bind 127.0.0.1:50051

In Kubernetes, leave --pod-name out and set POD_NAME/POD_IP/POD_NAMESPACE from the downward API.
What it shows, in order: the pod identity (from the environment or flags, checked at start-up), the
interceptor that stamps it on every response, connection-age settings, the health service, and a
SIGTERM handler that drains: NOT_SERVING at once, serving on for --drain-s (longer than the
clients' health-check interval) so they move their calls, then a graceful stop of --grace-s.
Kubernetes' terminationGracePeriodSeconds must exceed drain + grace (kubernetes/deployment.yaml).
"""

from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc

from grpc_balance_mw import PodIdentity, connection_age_options
from grpc_balance_mw.server import (
    DRAIN_S,
    GRACE_S,
    PodIdentityInterceptor,
    add_health,
    drain_on_signals,
)
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME, SyncChargePointsServicer
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pod-name", help="default: $POD_NAME, then $HOSTNAME")
    parser.add_argument("--bind", default="127.0.0.1:50051", help="host:port (port 0: any)")
    parser.add_argument("--service-time-ms", type=float, default=1.0)
    parser.add_argument(
        "--max-concurrent", type=int, default=None, help="beyond it: RESOURCE_EXHAUSTED"
    )
    parser.add_argument("--max-connection-age-s", type=float, default=30.0)
    parser.add_argument("--opaque-key", help="stamp a keyed hash instead of the pod name")
    parser.add_argument("--drain-s", type=float, default=DRAIN_S, help="serve on NOT_SERVING")
    parser.add_argument("--grace-s", type=float, default=GRACE_S, help="then the graceful stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    env = dict(os.environ)
    if args.pod_name:
        env["POD_NAME"] = args.pod_name
    identity = PodIdentity.from_env(env, opaque_key=args.opaque_key)  # fails now, not per call

    server = grpc.server(
        ThreadPoolExecutor(max_workers=16),
        interceptors=[PodIdentityInterceptor(identity)],
        options=connection_age_options(max_age_s=args.max_connection_age_s, grace_s=10),
        maximum_concurrent_rpcs=args.max_concurrent,
    )
    charge_points_pb2_grpc.add_ChargePointsServicer_to_server(
        SyncChargePointsServicer(identity.name, service_time_s=args.service_time_ms / 1000), server
    )
    health = add_health(server, services=(SERVICE_NAME,))
    port = server.add_insecure_port(args.bind)
    server.start()
    logging.info("pod %s serving on port %d", identity, port)

    # SIGTERM (the kubelet) or Ctrl-C: NOT_SERVING, serve --drain-s more, stop with --grace-s.
    # A second signal stops at once.
    drain_on_signals(server, health, drain_s=args.drain_s, grace_s=args.grace_s)
    server.wait_for_termination()
    logging.info(
        "pod %s stopped (health was %s)", identity, "NOT_SERVING" if health.shutting_down else "?"
    )


if __name__ == "__main__":
    main()
