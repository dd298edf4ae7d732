"""The gRPC channel contract, ``grpc.aio``: each test body runs against a bare aio channel and
every aio channel this package hands out, and must hold for all (issue 20)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from channel_contract_fixtures import (
    BAD_METADATA,
    CANCELLED,
    HAS_FAILED_S,
    INTERCEPTED,
    LATE_START_S,
    METER,
    POINT,
    SESSION,
    SHORT_S,
    SLOW_UPDATES,
    SOON,
    TRIES,
    WAIT_S,
    WAITER_SPACING_S,
    WAITERS,
    aio_channel,
    aio_server,
    cases,
    free_port,
    has_no_lane,
    options,
)
from conftest import AioPod

from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

#: A unary call that is still running when the test acts on it.
SLOW_CALL_S = 0.5


@pytest.fixture
async def channel(request: pytest.FixtureRequest, aio_pod: AioPod) -> AsyncIterator[Any]:
    made = aio_channel(request.param, aio_pod.target)
    yield made
    await asyncio.wait_for(made.close(), WAIT_S)


def _stub(channel: Any) -> pb_grpc.ChargePointsStub:
    return pb_grpc.ChargePointsStub(channel)


async def _bounded(awaitable: Awaitable[Any]) -> Any:
    """A wait that ends: a hang fails the test with asyncio.TimeoutError."""
    return await asyncio.wait_for(awaitable, WAIT_S)


async def _drain(call: Any) -> list[Any]:
    return [message async for message in call]


@pytest.mark.parametrize("channel", cases("aio", "metadata"), indirect=True)
async def test_a_metadata_value_that_is_not_a_str_raises_at_once(channel: Any) -> None:
    stub = _stub(channel)
    calls: tuple[Callable[[], Awaitable[Any]], ...] = (
        lambda: stub.GetChargePoint(POINT, metadata=BAD_METADATA, timeout=WAIT_S),
        lambda: _drain(stub.WatchStatus(SLOW_UPDATES, metadata=BAD_METADATA, timeout=WAIT_S)),
        lambda: stub.UploadMeterValues(iter(METER), metadata=BAD_METADATA, timeout=WAIT_S),
        lambda: _drain(stub.Session(iter(SESSION), metadata=BAD_METADATA, timeout=WAIT_S)),
    )
    for call in calls:
        with pytest.raises(TypeError):  # not asyncio.TimeoutError: it must not hang
            await _bounded(call())


@pytest.mark.parametrize("channel", cases("aio", "call_objects"), indirect=True)
async def test_the_four_call_kinds_give_grpc_aio_call_objects(channel: Any) -> None:
    stub = _stub(channel)
    call = stub.GetChargePoint(POINT, timeout=WAIT_S)
    assert (await _bounded(call)).id == "cp-1"
    assert await call.code() is grpc.StatusCode.OK and call.done()

    three = pb.WatchStatusRequest(id="cp-1", updates=3)
    stream = stub.WatchStatus(three, timeout=WAIT_S)
    read = [await _bounded(stream.read()) for _ in range(4)]
    assert [update.sequence for update in read[:3]] == [0, 1, 2] and read[3] is grpc.aio.EOF
    assert [update.sequence for update in await _bounded(_drain(stub.WatchStatus(three)))] == [
        0,
        1,
        2,
    ]

    # Stream-request calls made without a request iterator are written to.
    upload = stub.UploadMeterValues(timeout=WAIT_S)
    for value in METER:
        await _bounded(upload.write(value))
    await _bounded(upload.done_writing())
    assert (await _bounded(upload)).count == 2
    assert (await _bounded(stub.UploadMeterValues(iter(METER)))).total_energy_wh == 3.0

    session = stub.Session(timeout=WAIT_S)
    await _bounded(session.write(SESSION[0]))
    assert (await _bounded(session.read())).ack == "ack:start"
    await _bounded(session.write(SESSION[1]))
    await _bounded(session.done_writing())
    assert (await _bounded(session.read())).ack == "ack:stop"
    assert await _bounded(session.read()) is grpc.aio.EOF
    replies = await _bounded(_drain(stub.Session(iter(SESSION), timeout=WAIT_S)))
    assert [reply.ack for reply in replies] == ["ack:start", "ack:stop"]


@pytest.mark.parametrize("channel", cases("aio", "positional_timeout"), indirect=True)
async def test_a_stream_request_call_takes_its_timeout_positionally(channel: Any) -> None:
    upload = _stub(channel).UploadMeterValues(None, 0.3)  # never done writing: ends at 0.3 s
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _bounded(upload)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("channel", cases("aio", "cancel"), indirect=True)
async def test_cancelled_by_the_client_or_by_the_server(channel: Any) -> None:
    stub = _stub(channel)
    stream = stub.WatchStatus(SLOW_UPDATES, timeout=WAIT_S)
    await _bounded(stream.read())
    assert stream.cancel()
    assert await _bounded(stream.code()) is grpc.StatusCode.CANCELLED
    assert stream.cancelled()

    unary = stub.GetChargePoint(POINT, timeout=WAIT_S)
    assert unary.cancel()
    with pytest.raises(asyncio.CancelledError):
        await _bounded(unary)

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _bounded(
            stub.GetChargePoint(
                pb.GetChargePointRequest(id="cp-1", fail_with_code=CANCELLED), timeout=WAIT_S
            )
        )
    assert raised.value.code() is grpc.StatusCode.CANCELLED


async def _in_flight(pod: AioPod, count: int = 1) -> None:
    """Until the server runs ``count`` calls (bounded)."""
    for _ in range(int(WAIT_S / 0.005)):
        if pod.servicer.stats.in_flight >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"the server never ran {count} calls at once")


@pytest.mark.parametrize("channel", cases("aio", "cancel_task"), indirect=True)
async def test_cancelling_a_task_that_awaits_the_call_cancels_only_the_task(
    channel: Any, aio_pod: AioPod
) -> None:
    aio_pod.servicer.service_time_s = SLOW_CALL_S
    call = _stub(channel).GetChargePoint(POINT, timeout=WAIT_S)
    waiter = asyncio.get_running_loop().create_task(call.code())
    await _in_flight(aio_pod)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not call.cancelled()
    assert (await _bounded(call)).id == "cp-1"
    assert await call.code() is grpc.StatusCode.OK


class _Canceller(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """A user's interceptor that cancels every call it is handed."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        call.cancel()
        return call


#: The channels a user's interceptor can be put in front of: ours come after it.
_WITH_USER_INTERCEPTOR: dict[str, Callable[[str], Any]] = {
    "bare": lambda target: grpc.aio.insecure_channel(target, interceptors=[_Canceller()]),
    "interceptors": lambda target: grpc.aio.insecure_channel(
        target, interceptors=[_Canceller(), *balance_aio.affinity_interceptors(target, options())]
    ),
    "observe_intercepted": lambda target: balance_aio.observe(
        grpc.aio.insecure_channel(target, interceptors=[_Canceller()]), options()
    ),
    "dial_per_request": lambda target: balance_aio.dial_per_request_channel(
        target, interceptors=[_Canceller()], observe=options()
    ),
    "balanced": lambda target: balance_aio.balanced_channel(
        target, observe=options(), interceptors=[_Canceller()]
    ),
}


@pytest.mark.parametrize(
    "wrapper",
    [case for case in cases("aio", "user_interceptor") if case.id in _WITH_USER_INTERCEPTOR],
)
async def test_an_interceptor_in_front_can_cancel_the_call(wrapper: str, aio_pod: AioPod) -> None:
    aio_pod.servicer.service_time_s = SLOW_CALL_S
    async with _WITH_USER_INTERCEPTOR[wrapper](aio_pod.target) as channel:
        call = _stub(channel).GetChargePoint(POINT, timeout=WAIT_S)
        with pytest.raises(asyncio.CancelledError):
            await _bounded(call)
        assert call.cancelled()


@pytest.mark.parametrize("wrapper", cases("aio", "deadline"))
async def test_a_deadline_ends_the_call_and_time_remaining_counts_down(
    wrapper: str, aio_pod: AioPod
) -> None:
    channel = aio_channel(wrapper, aio_pod.target)
    try:
        stub = _stub(channel)
        stream = stub.WatchStatus(SLOW_UPDATES, timeout=0.5)
        unbounded = stub.GetChargePoint(POINT)
        if wrapper in INTERCEPTED:
            # Documented difference: grpc.aio's intercepted calls have no time_remaining().
            with pytest.raises(NotImplementedError):
                stream.time_remaining()
        else:
            remaining = stream.time_remaining()
            assert remaining is not None and 0 < remaining <= 0.5
            assert unbounded.time_remaining() is None
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _bounded(_drain(stream))
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await _bounded(unbounded)
    finally:
        await asyncio.wait_for(channel.close(), WAIT_S)


async def _failing_channel(wrapper: str, target: str) -> Any:
    """A channel to ``target``, where no server listens: it fails a call at once, has tried to
    connect for a while and, if it has lanes, has none left (see ``has_no_lane``; lanes are
    dialled and dropped on their own timing, so up to ``TRIES`` channels are made)."""
    for attempt in range(1, TRIES + 1):
        channel = aio_channel(wrapper, target, channel_options=SOON)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _bounded(_stub(channel).GetChargePoint(POINT, timeout=WAIT_S))
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(HAS_FAILED_S)
        for _ in range(int(SHORT_S / 0.01)):
            if has_no_lane(channel):
                return channel
            await asyncio.sleep(0.01)
        if attempt == TRIES:
            return channel
        await _bounded(channel.close())
    raise AssertionError("unreachable")


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
@pytest.mark.parametrize("wrapper", cases("aio", "wait_for_ready"))
async def test_wait_for_ready_waits_for_a_server_that_starts_later(wrapper: str) -> None:
    port = free_port()
    channel = await _failing_channel(wrapper, f"127.0.0.1:{port}")
    stub = _stub(channel)
    servers: list[grpc.aio.Server] = []

    async def start_late() -> None:
        await asyncio.sleep(LATE_START_S)
        servers.append((await aio_server(port))[0])

    late = asyncio.get_running_loop().create_task(start_late())
    try:
        waiting = []  # calls made one after another, meeting the channel as it changes
        for _ in range(WAITERS):
            waiting.append(
                stub.GetChargePoint(POINT, timeout=LATE_START_S + WAIT_S, wait_for_ready=True)
            )
            await asyncio.sleep(WAITER_SPACING_S)
        responses = await asyncio.wait_for(asyncio.gather(*waiting), LATE_START_S + WAIT_S)
        assert [response.served_by for response in responses] == ["late"] * WAITERS
    finally:
        await late
        await asyncio.wait_for(channel.close(), WAIT_S)
        for server in servers:
            await server.stop(None)


@pytest.mark.parametrize("channel", cases("aio", "close"), indirect=True)
async def test_close_cancels_the_calls_in_flight(channel: Any) -> None:
    stream = _stub(channel).WatchStatus(SLOW_UPDATES, timeout=SHORT_S)
    await _bounded(stream.read())
    await asyncio.wait_for(channel.close(), SHORT_S)
    # A channel that lets it run ends it at its deadline instead: DEADLINE_EXCEEDED.
    assert await _bounded(stream.code()) is grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("wrapper", cases("aio", "connectivity"))
async def test_connectivity_get_state_wait_for_state_change_channel_ready(
    wrapper: str, aio_pod: AioPod
) -> None:
    channel = aio_channel(wrapper, aio_pod.target)
    try:
        fresh = channel.get_state()
        assert fresh is grpc.ChannelConnectivity.IDLE  # a fresh channel is IDLE
        channel.get_state(try_to_connect=True)
        await asyncio.wait_for(channel.wait_for_state_change(fresh), SHORT_S)
        await asyncio.wait_for(channel.channel_ready(), SHORT_S)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await asyncio.wait_for(channel.close(), WAIT_S)


@pytest.mark.parametrize("wrapper", cases("aio", "compression"))
async def test_compression_for_the_channel_and_per_call(wrapper: str, aio_pod: AioPod) -> None:
    channel = aio_channel(wrapper, aio_pod.target, compression=grpc.Compression.Gzip)
    try:
        stub = _stub(channel)
        assert (await _bounded(stub.GetChargePoint(POINT, timeout=WAIT_S))).id == "cp-1"
        two = pb.WatchStatusRequest(id="cp-1", updates=2)
        deflated = stub.WatchStatus(two, timeout=WAIT_S, compression=grpc.Compression.Deflate)
        assert [update.sequence for update in await _bounded(_drain(deflated))] == [0, 1]
    finally:
        await asyncio.wait_for(channel.close(), WAIT_S)
