"""A client and a server with nothing but the core install: the wrapper sees the serving pod.

scripts/test_floors.sh runs this in a venv where a client's pinned grpcio and protobuf were
installed first and `pip install .` added only the core dependencies (no test extras, no
charge-points stubs): the call is the standard health check, which the server middleware stamps
like any other call.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import google.protobuf
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_balance_mw import PodIdentity
from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.client import observe_channel
from grpc_balance_mw.server import PodIdentityInterceptor, add_health


def main() -> int:
    identity = PodIdentity(name="charge-points-0", ip="127.0.0.1", namespace="smoke")
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[PodIdentityInterceptor(identity)])
    add_health(server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    registry = AffinityRegistry()
    try:
        with observe_channel(grpc.insecure_channel(target), target, registry=registry) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, reply
        snapshot = registry.detector(target).snapshot()
    finally:
        server.stop(None)
    if snapshot.known_pods != (identity.name,):
        print(f"smoke_client: the wrapper did not see the pod: {snapshot}", file=sys.stderr)
        return 1
    print(
        f"smoke_client: grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}: "
        f"3 calls observed on {snapshot.known_pods[0]}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
