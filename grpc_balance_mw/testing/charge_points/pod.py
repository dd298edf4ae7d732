"""A charge-points pod, one process: ``python -m grpc_balance_mw.testing.charge_points.pod``.

For example ``... --pod-name cp-0 --bind 127.0.0.1:0``.

It is what the local test cluster starts, one process per pod. It prints ``READY <port>`` on
stdout once it is serving, and stops gracefully on SIGTERM (health goes NOT_SERVING first).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import grpc

from grpc_balance_mw.aio.server import PodIdentityInterceptor, add_health
from grpc_balance_mw.connection_age import connection_age_options
from grpc_balance_mw.identity import POD_HEADER, PodIdentity
from grpc_balance_mw.load_meter import LoadMeter
from grpc_balance_mw.testing.charge_points.servicer import (
    SERVICE_NAME,
    ChargePointsServicer,
    PodAdminServicer,
)
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc, pod_admin_pb2_grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pod-name", default=None, help="default: $POD_NAME, then $HOSTNAME")
    parser.add_argument("--pod-ip", default=None, help="default: $POD_IP")
    parser.add_argument("--namespace", default=None, help="default: $POD_NAMESPACE")
    parser.add_argument("--bind", default="127.0.0.1:0", help="host:port; port 0 picks one")
    parser.add_argument("--service-time-ms", type=float, default=0.0)
    parser.add_argument("--max-concurrent", type=int, default=0, help="0: unlimited")
    parser.add_argument("--overflow", choices=("queue", "reject"), default="queue")
    parser.add_argument("--opaque-key", default=None, help="stamp a keyed hash, not the name")
    parser.add_argument(
        "--identity-header",
        default=POD_HEADER,
        help="the header the pod names itself in; empty: it stamps no identity",
    )
    parser.add_argument(
        "--fail-with",
        default=None,
        choices=[code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK],
        help="fail every call with this status while health says SERVING (a gray failure)",
    )
    parser.add_argument("--max-connection-age-s", type=float, default=None)
    parser.add_argument("--max-connection-age-grace-s", type=float, default=10.0)
    parser.add_argument("--shutdown-grace-s", type=float, default=2.0)
    parser.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="stop when stdin closes: the harness that started the pod is gone",
    )
    return parser.parse_args(argv)


def identity_from(args: argparse.Namespace) -> PodIdentity:
    env = dict(os.environ)
    for key, value in (
        ("POD_NAME", args.pod_name),
        ("POD_IP", args.pod_ip),
        ("POD_NAMESPACE", args.namespace),
    ):
        if value is not None:
            env[key] = value
    return PodIdentity.from_env(env, opaque_key=args.opaque_key)


class _NamedInHeader(PodIdentityInterceptor):
    """Stamps only the pod's name, in a header of the fleet's own (``x-pod-name``, say)."""

    def __init__(
        self, identity: PodIdentity, header: str, load_meter: LoadMeter | None = None
    ) -> None:
        super().__init__(identity, load_meter=load_meter)
        self._stamp = ((header, identity.name),)


def load_meter_for(charge_points: ChargePointsServicer) -> LoadMeter:
    """The pod's load meter: its capacity is the servicer's ``max_concurrent`` as it is now
    (the admin service can change it); without one (0), the CPU's utilization is reported."""
    return LoadMeter(capacity=lambda: charge_points.capacity.max_concurrent)


def stamping(
    identity: PodIdentity, header: str, load_meter: LoadMeter | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors that stamp ``identity`` in ``header`` and, with ``load_meter``, a load
    report in every call's trailer (none at all for an empty header: a fleet before it adopts
    the server half)."""
    if not header:
        return []
    if header == POD_HEADER:
        return [PodIdentityInterceptor(identity, load_meter=load_meter)]
    return [_NamedInHeader(identity, header, load_meter)]


async def serve(args: argparse.Namespace) -> None:
    identity = identity_from(args)
    # Without SO_REUSEPORT a second pod on the same IP and port fails to bind instead of
    # silently sharing the port, which the local cluster relies on to find a free target port.
    options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
    if args.max_connection_age_s:
        options += connection_age_options(
            args.max_connection_age_s, args.max_connection_age_grace_s
        )
    charge_points = ChargePointsServicer(
        identity.name,
        service_time_s=args.service_time_ms / 1000,
        max_concurrent=args.max_concurrent,
        overflow=args.overflow,
        fail_with=grpc.StatusCode[args.fail_with] if args.fail_with else None,
    )
    interceptors = stamping(identity, args.identity_header, load_meter_for(charge_points))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    charge_points_pb2_grpc.add_ChargePointsServicer_to_server(charge_points, server)
    health = await add_health(server, services=(SERVICE_NAME,))
    pod_admin_pb2_grpc.add_PodAdminServicer_to_server(
        PodAdminServicer(charge_points, health), server
    )
    port = server.add_insecure_port(args.bind)
    if port == 0:
        raise SystemExit(f"could not bind {args.bind}")
    await server.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    if args.stop_on_stdin_eof:
        watcher = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(watcher), sys.stdin)
        stdin_closed = asyncio.create_task(watcher.read())
        stdin_closed.add_done_callback(lambda _: stopping.set())
    print(f"READY {port}", flush=True)
    await stopping.wait()
    await server.stop(args.shutdown_grace_s)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
