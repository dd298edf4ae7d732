"""A charge-points pod, wired the way a real service adds grpc_balance_mw's server half.

    python examples/charge_points_server.py --pod-name charge-points-0 --bind 127.0.0.1:50051

In Kubernetes, leave --pod-name out and set POD_NAME/POD_IP/POD_NAMESPACE from the downward API.
What it shows, in order: the pod identity (from the environment or flags, checked at start-up), the
interceptor that stamps it on every response, connection-age settings, the health service that
goes NOT_SERVING as soon as shutdown begins, and a SIGTERM handler that drains before exiting.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from grpc_balance_mw import PodIdentity, connection_age_options
from grpc_balance_mw.server import PodIdentityInterceptor, add_health
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

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    # stop() reports NOT_SERVING first (add_health wraps it), then drains calls for 10 s.
    server.stop(grace=10).wait()
    logging.info(
        "pod %s stopped (health was %s)", identity, "NOT_SERVING" if health.shutting_down else "?"
    )


if __name__ == "__main__":
    main()
