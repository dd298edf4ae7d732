"""Pods that end calls before any response header, for the tests of calls that end early.

Every call kind of ``hostile.Test`` (methods named by kind, e.g. ``/hostile.Test/unary_stream``)
either echoes (``echo``) or aborts before sending anything (``abort``: a trailers-only response
whose trailers name the pod). Run as a script, it serves ``echo`` in a process of its own and
prints its port, so a test can SIGKILL it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import grpc
from leak_fixtures import server_with_own_workers

from grpc_balance_mw.identity import PodIdentity

CALL_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
SERVICE = "hostile.Test"
POD = PodIdentity("hostile-pod-0", "10.0.0.9", "ev")


def method_path(kind: str) -> str:
    return f"/{SERVICE}/{kind}"


def _abort(context: grpc.ServicerContext) -> None:
    context.set_trailing_metadata(POD.to_metadata())
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused before any header")


def handler(behaviour: str) -> grpc.GenericRpcHandler:
    """``hostile.Test`` with every call kind doing ``behaviour`` (``echo`` or ``abort``)."""
    echo = behaviour == "echo"

    def unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        if not echo:
            _abort(context)
        return request

    def unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if not echo:
            _abort(context)
        yield request
        yield request

    def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        if not echo:
            _abort(context)
        return b"".join(requests)

    def stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        if not echo:
            _abort(context)
        yield from requests

    handlers: dict[str, Any] = {
        "unary_unary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "unary_stream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "stream_unary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "stream_stream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def serve(behaviour: str | None) -> tuple[grpc.Server, str]:
    """A started server on loopback; ``behaviour`` None: no methods at all (UNIMPLEMENTED)."""
    server = server_with_own_workers(4)
    if behaviour is not None:
        server.add_generic_rpc_handlers([handler(behaviour)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def main() -> None:
    server, target = serve("echo")
    print(target.rsplit(":", 1)[1], flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
