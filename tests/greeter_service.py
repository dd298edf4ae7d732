"""A tiny Greeter service of the tests' own (not charge-points), with generic handlers.

``register`` is what ``LocalCluster(servicer=...)`` runs in each pod; ``python
tests/greeter_service.py`` is a whole server for ``LocalCluster(pod_command=...)``, which stamps
its pod identity itself, as docs/identity.md asks of a user's server.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from grpc_balance_mw.testing import PodInfo

METHOD = "/greeter.v1.Greeter/SayHello"


def _say_hello(pod_name: str) -> grpc.RpcMethodHandler:
    def say_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"hello " + request + b" from " + pod_name.encode()

    return grpc.unary_unary_rpc_method_handler(say_hello)


def add_greeter(server: grpc.Server, pod_name: str) -> None:
    handlers = {"SayHello": _say_hello(pod_name)}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("greeter.v1.Greeter", handlers),)
    )


def register(server: grpc.Server, pod: PodInfo) -> None:
    """``LocalCluster(servicer=register)``: the harness adds identity, health and counts."""
    add_greeter(server, pod.name)


def say_hello(
    channel: grpc.Channel, name: bytes = b"you", timeout: float = 10
) -> tuple[bytes, grpc.Call]:
    """One SayHello: the reply and the call (its metadata carries the serving pod)."""
    call_hello = channel.unary_unary(METHOD)
    reply, call = call_hello.with_call(name, timeout=timeout)
    return reply, call


def main() -> None:
    """The server a user would run as each pod: bind ``$POD_IP:$PORT``, stamp itself."""
    from grpc_balance_mw.server import PodIdentityInterceptor, add_health

    server = grpc.server(ThreadPoolExecutor(8), interceptors=[PodIdentityInterceptor()])
    add_greeter(server, os.environ["POD_NAME"])
    add_health(server)
    address = f"{os.environ['POD_IP']}:{os.environ['PORT']}"
    if server.add_insecure_port(address) == 0:
        sys.exit(f"could not bind {address}")
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    server.start()
    stopping.wait()
    server.stop(0.5).wait()


if __name__ == "__main__":
    main()
