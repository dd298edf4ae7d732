"""A gRPC client that knows nothing of grpc_balance_mw, observed with no change to its code.

Run it under OpenTelemetry's launcher and the package's instrumentor (entry point
``grpc_balance_mw``) observes every channel it makes, sync or ``grpc.aio``::

    pip install 'grpc_balance_mw[instrument]' opentelemetry-instrumentation-grpc \\
        grpcio-health-checking
    OTEL_TRACES_EXPORTER=console OTEL_METRICS_EXPORTER=none OTEL_LOGS_EXPORTER=none \\
    OTEL_PYTHON_GRPC_BALANCE_EXPECTED_PODS='charge-points.ev.svc.cluster.local:80=3' \\
        opentelemetry-instrument python examples/zero_code_client.py \\
        charge-points.ev.svc.cluster.local:80

Each call's span carries the serving pod (``grpc_balance_mw.pod``); when every call lands on
one of the three pods, the log says the channel is pinned and how to fix it. With
``OTEL_PYTHON_GRPC_BALANCE_REBALANCE=true`` the calls move onto several connections instead.
The calls are health checks so that any server with the standard health service will do
(the package's ``examples/charge_points_server.py`` pods have it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def run_sync(target: str, calls: int, interval_s: float) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(calls):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            time.sleep(interval_s)


async def run_aio(target: str, calls: int, interval_s: float) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(calls):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            await asyncio.sleep(interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the service")
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--interval", type=float, default=0.03, help="seconds between calls")
    parser.add_argument("--aio", action="store_true", help="use grpc.aio")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.aio:
        asyncio.run(run_aio(args.target, args.calls, args.interval))
    else:
        run_sync(args.target, args.calls, args.interval)
    print(f"{args.calls} calls to {args.target}")


if __name__ == "__main__":
    main()
