"""The per-call routing of the balanced and dial-per-request channels keeps grpc's contract.

Each test is run against the sync and the ``grpc.aio`` form wherever both exist. Pods are sync
servers on loopback (port 0); a hang is bounded (``asyncio.wait_for`` or a joined thread) so it
fails the test instead of blocking the run.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import tenacity
from conftest import SyncPod
from fault_load import until, wait_for
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import balanced as sync_balanced
from grpc_balance_mw import dial_per_request as sync_redial
from grpc_balance_mw import retry as retry_module
from grpc_balance_mw.aio import balanced as aio_balanced
from grpc_balance_mw.aio import dial_per_request as aio_redial
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool, PoolConfig
from grpc_balance_mw.retry import Deadline, RetryPolicy, call_with_retries
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)

HANG_S = 8.0
GET = "/chargepoints.v1.ChargePoints/GetChargePoint"
REQUEST = pb.GetChargePointRequest(id="cp-1")
LONG_WATCH = pb.WatchStatusRequest(id="cp-1", updates=1000, interval_ms=20)


def make(form: str, flavour: str, target: str, **kwargs: Any) -> Any:
    """A balanced or dial-per-request channel, sync or aio (aio: inside a running loop)."""
    module = {
        ("sync", "balanced"): sync_balanced.balanced_channel,
        ("sync", "dial"): sync_redial.dial_per_request_channel,
        ("aio", "balanced"): aio_balanced.balanced_channel,
        ("aio", "dial"): aio_redial.dial_per_request_channel,
    }[form, flavour]
    return module(target, **kwargs)


def bounded(run: Callable[[], Any], limit: float = HANG_S) -> Any:
    """``run()`` in a daemon thread: its result, or the test fails if it is still blocked."""
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append(run())
        except BaseException as error:  # handed to the test
            outcome.append(error)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        pytest.fail(f"still blocked after {limit} s")
    return outcome[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def late_pod(port: int, after_s: float) -> tuple[threading.Thread, list[SyncPod]]:
    """A pod that starts listening on ``port`` ``after_s`` seconds from now."""
    started: list[SyncPod] = []

    def start() -> None:
        time.sleep(after_s)
        pod = SyncPod.__new__(SyncPod)

        from grpc_balance_mw import server as sync_server
        from grpc_balance_mw.testing.charge_points.servicer import (
            SERVICE_NAME,
            SyncChargePointsServicer,
        )

        pod.server = server_with_own_workers(4)
        pod.servicer = SyncChargePointsServicer("late")
        pb_grpc.add_ChargePointsServicer_to_server(pod.servicer, pod.server)
        pod.health = sync_server.add_health(pod.server, services=(SERVICE_NAME,))
        pod.port = pod.server.add_insecure_port(f"127.0.0.1:{port}")
        pod.server.start()
        started.append(pod)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread, started


def no_connection(channel: Any) -> bool:
    """The balanced channel has no lane with a connection (its first checks failed)."""
    return all(lane.connection is None for lane in channel.pool.lanes)


def held(channel: Any) -> int:
    """Routes still held by calls: a balanced channel's lanes in flight, or a dial-per-request
    channel's open call connections."""
    if hasattr(channel, "pool"):
        return in_flight(channel)
    return len(channel._active)


def in_flight(channel: Any) -> int:
    return sum(lane.in_flight for lane in channel.pool.lanes)


FLAVOURS = ["balanced", "dial"]


# -- 1: invalid metadata fails at once ------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_aio_invalid_metadata_fails_at_once(sync_pod: SyncPod, flavour: str) -> None:
    channel = make("aio", flavour, sync_pod.target)
    try:
        stub = pb_grpc.ChargePointsStub(channel)
        with pytest.raises(TypeError):
            await asyncio.wait_for(
                stub.GetChargePoint(REQUEST, timeout=1, metadata=((42, 42),)), HANG_S
            )
        assert (await stub.GetChargePoint(REQUEST, timeout=5)).id == "cp-1"  # not wedged
    finally:
        await channel.close()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sync_invalid_metadata_fails_at_once(sync_pod: SyncPod, flavour: str) -> None:
    with make("sync", flavour, sync_pod.target) as channel:
        stub = pb_grpc.ChargePointsStub(channel)
        failed = bounded(lambda: stub.GetChargePoint(REQUEST, timeout=1, metadata=((42, 42),)))
        assert isinstance(failed, TypeError)


# -- 4: wait_for_ready, subscribe, the connectivity thread ---------------------------------


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
def test_sync_balanced_wait_for_ready_waits_for_a_late_server() -> None:
    port = free_port()
    with make("sync", "balanced", f"127.0.0.1:{port}") as channel:
        assert wait_for(lambda: no_connection(channel))  # the first checks failed
        stub = pb_grpc.ChargePointsStub(channel)
        starter, started = late_pod(port, 1.0)
        try:
            reply = bounded(lambda: stub.GetChargePoint(REQUEST, timeout=6, wait_for_ready=True))
            assert not isinstance(reply, BaseException), reply
            assert reply.id == "cp-1"
        finally:
            starter.join()
            for pod in started:
                pod.server.stop(None).wait()


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
def test_sync_balanced_wait_for_ready_stream_without_a_deadline_waits_too() -> None:
    port = free_port()
    with make("sync", "balanced", f"127.0.0.1:{port}") as channel:
        assert wait_for(lambda: no_connection(channel))
        stub = pb_grpc.ChargePointsStub(channel)
        starter, started = late_pod(port, 1.0)
        try:
            request = pb.WatchStatusRequest(id="cp-1", updates=2, interval_ms=1)
            updates = bounded(lambda: list(stub.WatchStatus(request, wait_for_ready=True)))
            assert not isinstance(updates, BaseException), updates
            assert [update.sequence for update in updates] == [0, 1]
        finally:
            starter.join()
            for pod in started:
                pod.server.stop(None).wait()


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
async def test_aio_balanced_wait_for_ready_waits_for_a_late_server() -> None:
    port = free_port()
    channel = make("aio", "balanced", f"127.0.0.1:{port}")
    starter: threading.Thread | None = None
    started: list[SyncPod] = []
    try:
        assert await until(lambda: no_connection(channel))  # the first checks failed
        starter, started = late_pod(port, 1.0)
        stub = pb_grpc.ChargePointsStub(channel)
        call = stub.GetChargePoint(REQUEST, timeout=6, wait_for_ready=True)
        assert (await asyncio.wait_for(call, HANG_S)).id == "cp-1"
    finally:
        await channel.close()
        if starter is not None:
            await asyncio.to_thread(starter.join)
        for pod in started:
            pod.server.stop(None).wait()


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
async def test_aio_balanced_wait_for_ready_stream_is_written_to_while_it_waits() -> None:
    port = free_port()
    channel = make("aio", "balanced", f"127.0.0.1:{port}")
    starter: threading.Thread | None = None
    started: list[SyncPod] = []
    try:
        assert await until(lambda: no_connection(channel))
        starter, started = late_pod(port, 1.0)
        call = pb_grpc.ChargePointsStub(channel).Session(timeout=6, wait_for_ready=True)
        await asyncio.wait_for(call.write(pb.SessionMessage(command="start")), HANG_S)
        await call.done_writing()
        replies = [reply.ack async for reply in call]
        assert replies == ["ack:start"]
        assert await call.code() is grpc.StatusCode.OK
    finally:
        await channel.close()
        if starter is not None:
            await asyncio.to_thread(starter.join)
        for pod in started:
            pod.server.stop(None).wait()


def test_sync_balanced_subscribe_without_a_connection_and_lanes_retired() -> None:
    """``subscribe`` works before any lane has a connection, and its callbacks survive the
    lanes being retired (grpcio's polling thread must not be left on a closed lane)."""
    crashes: list[Any] = []
    previous = threading.excepthook
    threading.excepthook = crashes.append
    port = free_port()
    states: list[grpc.ChannelConnectivity] = []
    try:
        with make("sync", "balanced", f"127.0.0.1:{port}") as channel:
            assert wait_for(lambda: no_connection(channel))
            channel.subscribe(states.append, try_to_connect=True)
            assert wait_for(lambda: bool(states))
            for lane in list(channel.pool.lanes):  # what a rotation does to a lane
                channel._close_lane(lane)
            threads = [t for t in threading.enumerate() if t is not threading.current_thread()]
            channel.unsubscribe(states.append)
        for thread in threads:
            if "balanced" not in thread.name:
                thread.join(0.2)
    finally:
        threading.excepthook = previous
    assert crashes == []


# -- 5: dial-per-request close() and connectivity -------------------------------------------


def test_sync_dial_close_cancels_a_stream_in_flight(sync_pod: SyncPod) -> None:
    channel = make("sync", "dial", sync_pod.target)
    stream = pb_grpc.ChargePointsStub(channel).WatchStatus(LONG_WATCH, timeout=30)
    assert next(stream).sequence == 0
    channel.close()
    ended = bounded(lambda: list(stream), 5.0)
    assert isinstance(ended, grpc.RpcError)
    assert ended.code() is grpc.StatusCode.CANCELLED


@pytest.mark.skipif(
    tuple(int(part) for part in grpc.__version__.split(".")[:2]) < (1, 85),
    reason="older grpc.aio's close() leaves a stream in flight to its deadline, bare "
    "channels included (tests/channel_contract_fixtures.py OLD_GRPC_AIO)",
)
async def test_aio_dial_close_cancels_a_stream_in_flight(sync_pod: SyncPod) -> None:
    channel = make("aio", "dial", sync_pod.target)
    stream = pb_grpc.ChargePointsStub(channel).WatchStatus(LONG_WATCH, timeout=30)
    assert (await stream.read()).sequence == 0
    await asyncio.wait_for(channel.close(), HANG_S)
    assert await asyncio.wait_for(stream.code(), 5) is grpc.StatusCode.CANCELLED


def test_sync_dial_channel_ready_future_completes(sync_pod: SyncPod) -> None:
    with make("sync", "dial", sync_pod.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)


async def test_aio_dial_connectivity_is_real(sync_pod: SyncPod) -> None:
    channel = make("aio", "dial", sync_pod.target)
    try:
        await asyncio.wait_for(channel.channel_ready(), 5)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
    dead = make("aio", "dial", f"127.0.0.1:{free_port()}")
    try:
        dead.get_state(try_to_connect=True)
        assert await until(lambda: dead.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    finally:
        await dead.close()


# -- 6: an unclosed balanced channel is released with its last reference --------------------


def test_sync_unclosed_balanced_channel_is_released(sync_pod: SyncPod) -> None:
    channel = make("sync", "balanced", sync_pod.target)
    thread = channel._thread
    assert pb_grpc.ChargePointsStub(channel).GetChargePoint(REQUEST, timeout=5).id == "cp-1"
    gone = weakref.ref(channel)
    del channel
    assert wait_for(lambda: gc.collect() >= 0 and gone() is None)
    thread.join(5)
    assert not thread.is_alive()


async def test_aio_unclosed_balanced_channel_is_released(sync_pod: SyncPod) -> None:
    channel = make("aio", "balanced", sync_pod.target)
    stub = pb_grpc.ChargePointsStub(channel)
    assert (await stub.GetChargePoint(REQUEST, timeout=5)).id == "cp-1"
    task, lanes = channel._task, list(channel.pool.lanes)
    gone = weakref.ref(channel)
    del channel, stub
    assert await until(lambda: gc.collect() >= 0 and gone() is None)
    await asyncio.wait_for(asyncio.wait({task}), 5)  # the maintenance task ends
    assert task.done()
    for lane in lanes:  # and every lane's connection is closed
        if lane.connection is not None:
            assert await until(
                lambda lane=lane: (
                    lane.connection.channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
                )
            )


# -- 7: arguments grpc takes ----------------------------------------------------------------


def test_sync_balanced_takes_compression(sync_pod: SyncPod) -> None:
    with sync_balanced.balanced_channel(sync_pod.target, compression=grpc.Compression.Gzip) as ch:
        assert pb_grpc.ChargePointsStub(ch).GetChargePoint(REQUEST, timeout=5).id == "cp-1"


class _Counting(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.calls = 0

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.calls += 1
        return await continuation(details, request)


async def test_aio_balanced_takes_interceptors(sync_pod: SyncPod) -> None:
    counting = _Counting()
    channel = aio_balanced.balanced_channel(sync_pod.target, interceptors=[counting])
    try:
        await pb_grpc.ChargePointsStub(channel).GetChargePoint(REQUEST, timeout=5)
    finally:
        await channel.close()
    assert counting.calls == 1


async def test_aio_dial_rejects_a_bad_interceptor_and_takes_a_positional_timeout(
    sync_pod: SyncPod,
) -> None:
    with pytest.raises(ValueError):
        aio_redial.dial_per_request_channel(sync_pod.target, interceptors=[object()])
    channel = aio_redial.dial_per_request_channel(sync_pod.target)
    try:
        upload = channel.stream_unary(
            "/chargepoints.v1.ChargePoints/UploadMeterValues",
            pb.MeterValue.SerializeToString,
            pb.UploadSummary.FromString,
        )
        # grpc.aio's stream-request calls take the timeout positionally
        assert (await upload(iter([pb.MeterValue(energy_wh=1.0)]), 5)).count == 1
    finally:
        await channel.close()


# -- 8: a response stream dropped half-read gives its lane back -----------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sync_stream_dropped_half_read_gives_its_route_back(
    sync_pod: SyncPod, flavour: str
) -> None:
    with make("sync", flavour, sync_pod.target) as channel:
        stub = pb_grpc.ChargePointsStub(channel)
        for _ in range(5):
            for _update in stub.WatchStatus(LONG_WATCH, timeout=30):
                break
        gc.collect()
        assert wait_for(lambda: held(channel) == 0), repr(channel)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_aio_stream_dropped_half_read_gives_its_route_back(
    sync_pod: SyncPod, flavour: str
) -> None:
    channel = make("aio", flavour, sync_pod.target)
    try:
        stub = pb_grpc.ChargePointsStub(channel)
        for _ in range(5):
            async for _update in stub.WatchStatus(LONG_WATCH, timeout=30):
                break
        gc.collect()
        assert await until(lambda: held(channel) == 0), repr(channel)
    finally:
        await channel.close()


# -- 11: a call that passed its deadline is reported as such --------------------------------


class _Recording(LanePool):
    def __init__(self) -> None:
        super().__init__(PoolConfig(min_lanes=1, max_lanes=1))
        self.timed_out: list[bool] = []

    def release(
        self, lane: Any, unavailable: bool = False, *, timed_out: bool = False, **rest: Any
    ) -> None:
        self.timed_out.append(timed_out)
        super().release(lane, unavailable, **rest)


def test_sync_balanced_reports_a_deadline_to_the_pool(sync_pod: SyncPod) -> None:
    pool = _Recording()
    factory = sync_balanced.channel_factory(sync_pod.target)
    with sync_balanced.BalancedChannel(factory, sync_pod.target, pool=pool) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            list(pb_grpc.ChargePointsStub(channel).WatchStatus(LONG_WATCH, timeout=0.2))
        assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for(lambda: True in pool.timed_out)


async def test_aio_balanced_reports_a_deadline_to_the_pool(sync_pod: SyncPod) -> None:
    pool = _Recording()
    factory = aio_balanced.channel_factory(sync_pod.target)
    channel = aio_balanced.BalancedChannel(factory, sync_pod.target, pool=pool)
    try:
        call = pb_grpc.ChargePointsStub(channel).WatchStatus(LONG_WATCH, timeout=0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            [_ async for _ in call]
        assert await until(lambda: True in pool.timed_out)
    finally:
        await channel.close()


# -- 14 / 17: the default policy rides out a restart; tenacity only for retryable failures ---


class Failed(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(code.name)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _drive(policy: RetryPolicy, failures: list[Failed], **kwargs: Any) -> int:
    attempts = 0

    def attempt() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= len(failures):
            raise failures[attempts - 1]
        return "ok"

    assert call_with_retries(policy, Deadline(30.0), attempt, lambda _s: None, **kwargs) == "ok"
    return attempts


def test_default_policy_retries_until_the_deadline_not_three_times() -> None:
    policy = RetryPolicy(methods={GET})
    assert _drive(policy, [Failed(grpc.StatusCode.UNAVAILABLE)] * 7) == 8


def test_a_call_that_never_left_the_client_is_retried_unmarked() -> None:
    refused = Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last ...")
    assert _drive(RetryPolicy(), [refused, refused], idempotent=False) == 3
    with pytest.raises(Failed):  # an UNAVAILABLE from the server side may have acted: sent once
        _drive(
            RetryPolicy(), [Failed(grpc.StatusCode.UNAVAILABLE, "pod says no")], idempotent=False
        )


def test_tenacity_is_not_built_for_a_failure_that_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("tenacity built for a failure that is not retried")

    monkeypatch.setattr(tenacity, "Retrying", refuse)
    monkeypatch.setattr(retry_module.tenacity, "Retrying", refuse)
    with pytest.raises(Failed):
        _drive(RetryPolicy(methods={GET}), [Failed(grpc.StatusCode.INTERNAL)])


@pytest.mark.parametrize("form", ["sync", "aio"])
def test_dial_rides_out_a_late_server_without_marking_methods(form: str) -> None:
    """The default policy, no method marked idempotent: a call made while nothing listens
    never left the client, so it is sent again until the server is up."""
    port = free_port()
    starter, started = late_pod(port, 0.5)
    target = f"127.0.0.1:{port}"
    try:
        if form == "sync":
            with make("sync", "dial", target, retry=RetryPolicy()) as channel:
                stub = pb_grpc.ChargePointsStub(channel)
                assert stub.GetChargePoint(REQUEST, timeout=8).id == "cp-1"
        else:

            async def run() -> Any:
                channel = make("aio", "dial", target, retry=RetryPolicy())
                try:
                    return await pb_grpc.ChargePointsStub(channel).GetChargePoint(
                        REQUEST, timeout=8
                    )
                finally:
                    await channel.close()

            assert asyncio.run(run()).id == "cp-1"
    finally:
        starter.join()
        for pod in started:
            pod.server.stop(None).wait()


# -- 18: a channel factory given observe options says how to fix it -------------------------


@pytest.mark.parametrize("module", [sync_balanced, aio_balanced], ids=["sync", "aio"])
def test_channel_factory_refuses_observe_options(module: Any) -> None:
    with pytest.raises(ConfigurationError, match="ObserveOptions"):
        module.channel_factory("svc:50051", None, ObserveOptions())
