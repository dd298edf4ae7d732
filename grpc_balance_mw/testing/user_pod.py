"""A pod that serves the user's own servicer: ``python -m grpc_balance_mw.testing.user_pod``.

For example ``... --register myapp.testing:register --pod-name greeter-0 --bind 127.0.0.1:0``.

:class:`~grpc_balance_mw.testing.LocalCluster` starts one per pod when given ``servicer=``. The
process imports the ``module:function`` reference, builds a sync ``grpc.server`` with the pod
identity (:class:`~grpc_balance_mw.server.PodIdentityInterceptor`), the standard health service
and a counting interceptor, and lets the function add the user's services. The harness's
``PodAdmin`` service on the same port reports the counts (every call to a method that is not
health or admin) and flips health, so :meth:`LocalCluster.served` and ``set_serving`` work as
for the harness's own pods. It prints ``READY <port>`` once serving and stops on SIGTERM or
when stdin closes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from grpc_balance_mw.connection_age import connection_age_options
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.load_meter import LoadMeter
from grpc_balance_mw.server import PodHealth, PodIdentityInterceptor, add_health
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2 as admin_pb
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2_grpc as admin_grpc

__all__ = ["PodInfo", "RegisterServicer", "main", "resolve_register"]

#: Calls to these services are the harness's own, not the user's: they are not counted.
_UNCOUNTED = ("/grpc.health.v1.Health/", "/chargepoints.v1.PodAdmin/")


@dataclass(frozen=True)
class PodInfo:
    """Who the pod is, for a register function that wants it (e.g. to answer with its name)."""

    name: str
    ip: str
    namespace: str


class RegisterServicer(Protocol):
    """``register(server, pod)``: add the user's services to ``server`` (a sync ``grpc.Server``,
    not yet started) for the pod ``pod``. Called once in each pod process."""

    def __call__(self, server: grpc.Server, pod: PodInfo, /) -> None: ...


def resolve_register(reference: str) -> RegisterServicer:
    """Import a ``module:function`` reference (the form that crosses into a pod process)."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"servicer must be 'module:function', got {reference!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ConfigurationError(f"{reference} is not callable")
    register: RegisterServicer = target
    return register


class _CallCounter(grpc.ServerInterceptor):
    """Counts the calls the pod receives, by method, whatever the user's methods are."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if not method.startswith(_UNCOUNTED):
            with self._lock:
                self.calls[method] += 1
        return continuation(handler_call_details)

    def snapshot(self, *, reset: bool) -> Counter[str]:
        with self._lock:
            calls = Counter(self.calls)
            if reset:
                self.calls.clear()
            return calls


class _Admin(admin_grpc.PodAdminServicer):
    """``PodAdmin`` for a user pod: counts and health; no service time or capacity to set."""

    def __init__(self, pod_name: str, counter: _CallCounter, health: PodHealth) -> None:
        self._pod_name = pod_name
        self._counter = counter
        self._health = health
        self._serving = True

    def _snapshot(self, *, reset: bool = False) -> admin_pb.PodStats:
        calls = self._counter.snapshot(reset=reset)
        return admin_pb.PodStats(
            pod_name=self._pod_name,
            calls=dict(calls),
            total_calls=sum(calls.values()),
            serving=self._serving,
        )

    def GetStats(
        self, request: admin_pb.GetStatsRequest, context: grpc.ServicerContext
    ) -> admin_pb.PodStats:
        return self._snapshot(reset=request.reset)

    def SetServing(
        self, request: admin_pb.SetServingRequest, context: grpc.ServicerContext
    ) -> admin_pb.PodStats:
        self._health.set_serving(request.serving)
        self._serving = request.serving
        return self._snapshot()

    def Configure(
        self, request: admin_pb.ConfigureRequest, context: grpc.ServicerContext
    ) -> admin_pb.PodStats:
        context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "a pod running the user's servicer has no service time or capacity to configure",
        )
        raise AssertionError("abort returned")  # pragma: no cover


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--register", required=True, help="module:function adding the services")
    parser.add_argument("--pod-name", required=True)
    parser.add_argument("--pod-ip", default="127.0.0.1")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--bind", default="127.0.0.1:0", help="host:port; port 0 picks one")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--max-connection-age-s", type=float, default=None)
    parser.add_argument("--shutdown-grace-s", type=float, default=0.5)
    parser.add_argument("--stop-on-stdin-eof", action="store_true")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> None:
    register = resolve_register(args.register)
    env = {**os.environ, "POD_NAME": args.pod_name, "POD_IP": args.pod_ip}
    env["POD_NAMESPACE"] = args.namespace
    identity = PodIdentity.from_env(env)
    # No SO_REUSEPORT: a port taken on this IP fails the bind instead of being shared, which the
    # cluster relies on to find a target port free on every pod IP.
    options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
    if args.max_connection_age_s:
        options += connection_age_options(args.max_connection_age_s, 10.0)
    counter = _CallCounter()
    server = grpc.server(
        ThreadPoolExecutor(args.workers),
        # Load reports with capacity = the executor's workers: the calls it serves at once.
        interceptors=[
            counter,
            PodIdentityInterceptor(identity, load_meter=LoadMeter(capacity=args.workers)),
        ],
        options=options,
    )
    register(server, PodInfo(args.pod_name, args.pod_ip, args.namespace))
    health = add_health(server)
    admin_grpc.add_PodAdminServicer_to_server(_Admin(args.pod_name, counter, health), server)
    port = server.add_insecure_port(args.bind)
    if port == 0:
        raise SystemExit(f"could not bind {args.bind}")
    server.start()

    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    if args.stop_on_stdin_eof:

        def watch_stdin() -> None:
            sys.stdin.buffer.read()
            stopping.set()

        threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()
    print(f"READY {port}", flush=True)
    stopping.wait()
    server.stop(args.shutdown_grace_s).wait()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    serve(parse_args(argv))


if __name__ == "__main__":
    main()
