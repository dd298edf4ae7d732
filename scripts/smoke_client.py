"""A client and a server with nothing but the core install: the wrapper sees the serving pod.

scripts/test_floors.sh runs this in a venv where a client's pinned grpcio and protobuf were
installed first and a plain `pip install .` added only the core dependencies (no extras, no
charge-points stubs, no grpcio-health-checking). The server is a generic bytes handler with the
identity interceptor (and a health Check answered as raw bytes); the client observes it with
`observe()`, and the pod probe's hand-encoded health check reads the pod on a fresh connection.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import grpc

from grpc_balance_mw import ObserveOptions, PodIdentity, observe
from grpc_balance_mw.affinity import AffinityDetector, AffinityRegistry
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.server import PodIdentityInterceptor

METHOD = "/smoke.Echo/Echo"


def _echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return request


def main() -> int:
    identity = PodIdentity(name="charge-points-0", ip="127.0.0.1", namespace="smoke")
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[PodIdentityInterceptor(identity)])
    handler = grpc.method_handlers_generic_handler(
        "smoke.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    # The health service as its bytes: SERVING (the real one needs the `server` extra).
    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {"Check": grpc.unary_unary_rpc_method_handler(lambda _request, _context: b"\x08\x01")},
    )
    server.add_generic_rpc_handlers((handler, health))
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    registry = AffinityRegistry()
    try:
        with observe(grpc.insecure_channel(target), ObserveOptions(registry=registry)) as channel:
            echo = channel.unary_unary(METHOD)
            for _ in range(3):
                assert echo(b"ping", timeout=5) == b"ping"
        snapshot = registry.detector(target).snapshot()
        probe = PodProbe(target, AffinityDetector(target), connections=1)
        probed = probe.probe_once()
    finally:
        server.stop(None)
    if snapshot.known_pods != (identity.name,) or identity.name not in probed:
        print(f"smoke_client: the pod was not seen: {snapshot}, probe {probed}", file=sys.stderr)
        return 1
    print(
        f"smoke_client: grpcio {grpc.__version__}: 3 calls observed on "
        f"{snapshot.known_pods[0]}, the probe found {probed}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
