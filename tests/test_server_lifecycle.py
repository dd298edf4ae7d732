"""Server middleware against real servers: health flips on shutdown, opaque ids, connection age,
handlers that send their own metadata, and configuration errors at start-up."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import IDENTITY, AioPod, SyncPod
from grpc_health.v1 import health_pb2, health_pb2_grpc
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import (
    POD_HEADER,
    ConfigurationError,
    PodIdentity,
    connection_age_options,
    pod_from_metadata,
)
from grpc_balance_mw import server as sync_server
from grpc_balance_mw.aio import server as aio_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_sync_health_goes_not_serving_when_stop_begins() -> None:
    pod = SyncPod()
    channel = grpc.insecure_channel(pod.target)
    health = health_pb2_grpc.HealthStub(channel)
    check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert check.status == SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == SERVING
    assert pod_from_metadata(watch.initial_metadata()) == IDENTITY  # health carries the identity
    stopped = pod.server.stop(grace=3)
    assert next(watch).status == NOT_SERVING  # seen on an open stream, before the server is gone
    assert pod.health.shutting_down and not pod.health.serving
    watch.cancel()  # an open Watch would hold the graceful stop for the whole grace period
    assert stopped.wait(10)
    channel.close()


async def test_aio_health_goes_not_serving_when_stop_begins() -> None:
    import asyncio

    pod = await AioPod().start()
    async with grpc.aio.insecure_channel(pod.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == SERVING
        assert pod_from_metadata(await watch.initial_metadata()) == IDENTITY
        stopping = asyncio.create_task(pod.server.stop(3))
        assert (await watch.read()).status == NOT_SERVING
        assert pod.health.shutting_down and not pod.health.serving
        watch.cancel()
        await stopping


def test_set_serving_is_visible_to_clients() -> None:
    pod = SyncPod()
    with grpc.insecure_channel(pod.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        pod.health.set_serving(False)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
        service = health_pb2.HealthCheckRequest(service="chargepoints.v1.ChargePoints")
        assert health.Check(service, timeout=5).status == NOT_SERVING
        pod.health.set_serving(True)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    pod.server.stop(None).wait()


def test_opaque_identity_is_stable_across_restarts_and_hides_the_name() -> None:
    real = PodIdentity("charge-points-0", "10.244.0.5", "ev")
    seen = []
    for _restart in range(2):
        pod = SyncPod(real.to_opaque("cluster-key-0123456789"))
        with grpc.insecure_channel(pod.target) as channel:
            seen.append(call_sync(channel, "unary_unary"))
        pod.server.stop(None).wait()
    first, second = seen
    assert first.initial[POD_HEADER] == second.initial[POD_HEADER]
    assert first.initial[POD_HEADER].startswith("pod-")
    for metadata in (first.initial, first.trailing):
        assert not any(real.name in str(v) or real.ip in str(v) for v in metadata.values())
    assert len(first.initial) == 1  # no IP or namespace header in opaque mode


async def test_aio_opaque_identity_matches_sync() -> None:
    opaque = PodIdentity("charge-points-0").to_opaque("cluster-key-0123456789")
    pod = await AioPod(opaque).start()
    async with grpc.aio.insecure_channel(pod.target) as channel:
        seen = await call_aio(channel, "unary_stream")
    await pod.server.stop(None)
    assert pod_from_metadata(seen.initial.items()) == opaque


def test_missing_identity_fails_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("POD_NAME", "HOSTNAME", "POD_IP", "POD_NAMESPACE", "GRPC_BALANCE_POD_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigurationError, match="POD_NAME"):
        sync_server.PodIdentityInterceptor()
    with pytest.raises(ConfigurationError, match="POD_NAME"):
        aio_server.PodIdentityInterceptor()
    monkeypatch.setenv("POD_NAME", "bad name\t")
    with pytest.raises(ConfigurationError, match=r"not printable ASCII|whitespace"):
        sync_server.PodIdentityInterceptor()


@pytest.mark.parametrize(("age", "grace"), [(0, 1), (1, 0), (-1, 1)])
def test_connection_age_rejects_non_positive(age: float, grace: float) -> None:
    with pytest.raises(ConfigurationError):
        connection_age_options(age, grace)


def test_connection_age_makes_clients_reconnect() -> None:
    peers: set[str] = set()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        peers.add(context.peer())
        return request

    server = server_with_own_workers(
        4,
        options=connection_age_options(max_age_s=0.3, grace_s=0.2),
        handlers=[
            grpc.method_handlers_generic_handler(
                "t.T", {"U": grpc.unary_unary_rpc_method_handler(unary)}
            )
        ],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/t.T/U")
        deadline = time.monotonic() + 10
        while len(peers) < 3 and time.monotonic() < deadline:
            call(b"x", timeout=5, wait_for_ready=True)
            time.sleep(0.05)
    server.stop(None).wait()
    assert len(peers) >= 3, peers  # one channel, three connections: the server closed them


def _echo_server_with_own_metadata(stamp: PodIdentity) -> tuple[grpc.Server, int]:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata([("x-user-initial", "1"), (POD_HEADER, "spoofed")])
        context.set_trailing_metadata([("x-user-trailing", "2")])
        return request

    server = server_with_own_workers(
        4,
        interceptors=[sync_server.PodIdentityInterceptor(stamp)],
        handlers=[
            grpc.method_handlers_generic_handler(
                "t.T", {"U": grpc.unary_unary_rpc_method_handler(unary)}
            )
        ],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_handler_metadata_is_kept_and_identity_cannot_be_spoofed() -> None:
    server, port = _echo_server_with_own_metadata(IDENTITY)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        _, call = channel.unary_unary("/t.T/U").with_call(b"x", timeout=5)
        initial, trailing = dict(call.initial_metadata()), dict(call.trailing_metadata())
    server.stop(None).wait()
    assert initial["x-user-initial"] == "1" and initial[POD_HEADER] == IDENTITY.name
    assert trailing["x-user-trailing"] == "2" and trailing[POD_HEADER] == IDENTITY.name


def test_unknown_method_is_left_to_grpc() -> None:
    pod = SyncPod()
    with grpc.insecure_channel(pod.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/nope.Nope/Nope")(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    pod.server.stop(None).wait()


def test_stamping_survives_client_cancellation() -> None:
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

    pod = SyncPod()
    with grpc.insecure_channel(pod.target) as channel:
        stream = pb_grpc.ChargePointsStub(channel).WatchStatus(
            pb.WatchStatusRequest(id="cp", updates=50, interval_ms=20), timeout=10
        )
        assert next(stream).sequence == 0
        assert pod_from_metadata(stream.initial_metadata()) == IDENTITY
        stream.cancel()
        done = threading.Event()
        stream.add_done_callback(lambda _: done.set())
        assert done.wait(5)
        # The server is still healthy afterwards.
        assert call_sync(channel, "unary_unary").code == grpc.StatusCode.OK
    pod.server.stop(None).wait()
