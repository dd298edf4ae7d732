"""The package's own ``grpc.health.v1.Health`` service, sync and aio servers: what grpc_health's
generated client and our hand-encoded check read from it (Check, Watch, NOT_FOUND), the flip a
drain makes, and that serving it needs no grpcio-health-checking."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import IDENTITY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from leak_fixtures import server_with_own_workers
from test_server_drain import LoopThread

from grpc_balance_mw import pod_from_metadata
from grpc_balance_mw import server as sync_server
from grpc_balance_mw.aio import server as aio_server
from grpc_balance_mw.health_check import (
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    check_method,
)

SERVICE = "chargepoints.v1.ChargePoints"
DRAIN_S = 5.0
THREADS = 4  # the sync server's pool: few enough that watches left open would exhaust it


class Served:
    """A server of one flavour with the identity interceptor and ``add_health`` only; its
    ``PodHealth`` driven from the test thread whichever the flavour."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = LoopThread() if mode == "aio" else None
        if self.loop is None:
            self.server: Any = server_with_own_workers(
                THREADS,
                interceptors=[sync_server.PodIdentityInterceptor(IDENTITY)],
            )
            self.health: Any = sync_server.add_health(self.server, services=(SERVICE,))
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.server.start()
        else:
            self.loop.run(self._start_aio())
        self.target = f"127.0.0.1:{self.port}"

    async def _start_aio(self) -> None:
        self.server = grpc.aio.server(interceptors=[aio_server.PodIdentityInterceptor(IDENTITY)])
        self.health = await aio_server.add_health(self.server, services=(SERVICE,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def run(self, result: Any) -> Any:
        """A PodHealth method's result: the aio ones are coroutines for the server's loop."""
        return result if self.loop is None else self.loop.run(result)

    def in_background(self, stop: Any) -> threading.Thread:
        """Run ``stop(server, health)`` (a drain, a stop) in a thread; join it to wait."""
        if self.loop is None:
            target: Any = lambda: stop(self.server, self.health)  # noqa: E731
        else:
            target = lambda: self.run(stop(self.server, self.health))  # noqa: E731
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self.loop is None:
            self.server.stop(None).wait(10)
        else:
            self.loop.run(self.server.stop(None))
            self.loop.close()


@pytest.fixture(params=["sync", "aio"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    running = Served(request.param)
    yield running
    running.close()


def _request(service: str = "") -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def test_check_answers_grpc_healths_own_client(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply, call = stub.Check.with_call(_request(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert pod_from_metadata(call.initial_metadata()) == IDENTITY
        assert stub.Check(_request(SERVICE), timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(_request("no.such.Service"), timeout=5)
        assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
        assert pod_from_metadata(unknown.value.trailing_metadata()) == IDENTITY
        served.run(served.health.set(SERVICE, NOT_SERVING))
        assert stub.Check(_request(SERVICE), timeout=5).status == NOT_SERVING
        assert check_method(channel)(SERVICE, timeout=5) == NOT_SERVING  # the hand-encoded one
        assert check_method(channel)("", timeout=5) == SERVING  # the others are unchanged


def test_watch_streams_each_change_once(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(_request(SERVICE), timeout=20)
        unknown = stub.Watch(_request("late.Service"), timeout=20)
        assert next(watch).status == SERVING
        assert pod_from_metadata(watch.initial_metadata()) == IDENTITY
        assert next(unknown).status == SERVICE_UNKNOWN  # open, waiting for it to be set
        served.run(served.health.set(SERVICE, NOT_SERVING))
        assert next(watch).status == NOT_SERVING
        served.run(served.health.set(SERVICE, NOT_SERVING))  # no change: nothing to send
        served.run(served.health.set_serving(True))
        assert next(watch).status == SERVING  # not a second NOT_SERVING
        served.run(served.health.set("late.Service", SERVING))
        assert next(unknown).status == SERVING
        watch.cancel()
        unknown.cancel()


def test_cancelled_watches_give_their_threads_back(served: Served) -> None:
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _round in range(3):  # 3 x THREADS watches: each round's must end to serve the next
            watches = [stub.Watch(_request(), timeout=20) for _ in range(THREADS)]
            assert [next(watch).status for watch in watches] == [SERVING] * THREADS
            for watch in watches:
                watch.cancel()
        assert stub.Check(_request(), timeout=5).status == SERVING


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
def test_a_drain_reports_not_serving_for_good_while_it_still_serves(served: Served) -> None:
    drain = (sync_server if served.loop is None else aio_server).drain
    with grpc.insecure_channel(served.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(_request(SERVICE), timeout=20)
        assert next(watch).status == SERVING
        # DRAIN_S: the calls below take milliseconds; the stop that follows needs none of them.
        draining = served.in_background(lambda s, h: drain(s, h, drain_s=DRAIN_S, grace_s=0))
        assert next(watch).status == NOT_SERVING  # on the open stream
        for service in ("", SERVICE):
            assert stub.Check(_request(service), timeout=5).status == NOT_SERVING
        served.run(served.health.set_serving(True))  # too late: the drain holds
        served.run(served.health.set(SERVICE, SERVING))
        assert stub.Check(_request(SERVICE), timeout=5).status == NOT_SERVING
        assert served.health.shutting_down and not served.health.serving
        served.run(served.health.enter_graceful_shutdown())  # twice is harmless
        watch.cancel()
    draining.join(DRAIN_S + 10)
    assert not draining.is_alive()


def test_stop_flips_an_open_watch_first(served: Served) -> None:
    stop = (lambda s, h: s.stop(5).wait()) if served.loop is None else (lambda s, h: s.stop(5))
    with grpc.insecure_channel(served.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(_request(), timeout=20)
        assert next(watch).status == SERVING
        stopping = served.in_background(stop)
        assert next(watch).status == NOT_SERVING  # before the server is gone
        watch.cancel()  # an open Watch would hold the graceful stop for its whole grace
    stopping.join(15)
    assert not stopping.is_alive()


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_serving_health_needs_no_grpcio_health_checking(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in sys.modules if n.startswith("grpc_health")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "grpc_health", None)  # as if not installed
    again = Served(mode)  # add_health() with grpc_health unimportable
    try:
        with grpc.insecure_channel(again.target) as channel:
            status, call = check_method(channel).with_call("", timeout=5)
            assert status == SERVING
            assert pod_from_metadata(call.initial_metadata()) == IDENTITY
    finally:
        again.close()
