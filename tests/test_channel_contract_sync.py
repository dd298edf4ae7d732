"""The gRPC channel contract, sync: each test body runs against a bare ``grpc`` channel and
every channel this package hands out, and must hold for all (issue 20)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from channel_contract_fixtures import (
    BAD_METADATA,
    CANCELLED,
    HAS_FAILED_S,
    LATE_START_S,
    METER,
    MULTI_CONNECTION,
    POINT,
    SESSION,
    SHORT_S,
    SLOW_UPDATES,
    SOON,
    TRIES,
    WAIT_S,
    WAITER_SPACING_S,
    WAITERS,
    MethodLog,
    cases,
    free_port,
    has_no_lane,
    sync_channel,
    sync_server,
)
from conftest import SyncPod

from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

HEALTH = "/grpc.health.v1.Health/"
#: How often grpcio's connectivity polling thread looks, plus a margin.
POLL_PERIOD_S = 0.3


@pytest.fixture
def channel(request: pytest.FixtureRequest, sync_pod: SyncPod) -> Iterator[grpc.Channel]:
    made = sync_channel(request.param, sync_pod.target)
    yield made
    made.close()


def _stub(channel: grpc.Channel) -> pb_grpc.ChargePointsStub:
    return pb_grpc.ChargePointsStub(channel)


@pytest.mark.parametrize("channel", cases("sync", "metadata"), indirect=True)
def test_a_metadata_value_that_is_not_a_str_raises_at_once(channel: grpc.Channel) -> None:
    stub = _stub(channel)
    calls = (
        lambda: stub.GetChargePoint(POINT, metadata=BAD_METADATA, timeout=WAIT_S),
        lambda: list(stub.WatchStatus(SLOW_UPDATES, metadata=BAD_METADATA, timeout=WAIT_S)),
        lambda: stub.UploadMeterValues(iter(METER), metadata=BAD_METADATA, timeout=WAIT_S),
        lambda: list(stub.Session(iter(SESSION), metadata=BAD_METADATA, timeout=WAIT_S)),
    )
    for call in calls:
        # A wrapper that hangs instead ends at the deadline with an RpcError, not TypeError.
        with pytest.raises(TypeError):
            call()


@pytest.mark.parametrize("channel", cases("sync", "call_objects"), indirect=True)
def test_the_four_call_kinds_give_grpc_call_objects(channel: grpc.Channel) -> None:
    stub = _stub(channel)
    response, call = stub.GetChargePoint.with_call(POINT, timeout=WAIT_S)
    assert (response.id, call.code()) == ("cp-1", grpc.StatusCode.OK)
    future = stub.GetChargePoint.future(POINT, timeout=WAIT_S)
    assert future.result(timeout=WAIT_S).id == "cp-1" and future.code() is grpc.StatusCode.OK

    stream = stub.WatchStatus(pb.WatchStatusRequest(id="cp-1", updates=3), timeout=WAIT_S)
    assert next(stream).sequence == 0  # next() and iteration, as grpc's stream is an iterator
    assert [update.sequence for update in stream] == [1, 2]
    assert stream.code() is grpc.StatusCode.OK

    summary, call = stub.UploadMeterValues.with_call(iter(METER), timeout=WAIT_S)
    assert (summary.count, call.code()) == (2, grpc.StatusCode.OK)
    future = stub.UploadMeterValues.future(iter(METER), timeout=WAIT_S)
    assert future.result(timeout=WAIT_S).total_energy_wh == 3.0

    replies = stub.Session(iter(SESSION), timeout=WAIT_S)
    assert [reply.ack for reply in replies] == ["ack:start", "ack:stop"]
    assert replies.code() is grpc.StatusCode.OK


@pytest.mark.parametrize("channel", cases("sync", "cancel"), indirect=True)
def test_cancelled_by_the_client_or_by_the_server(channel: grpc.Channel) -> None:
    stub = _stub(channel)
    stream = stub.WatchStatus(SLOW_UPDATES, timeout=WAIT_S)
    next(stream)
    assert stream.cancel()
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert raised.value.code() is grpc.StatusCode.CANCELLED
    assert stream.code() is grpc.StatusCode.CANCELLED

    future = stub.UploadMeterValues.future(iter(METER), timeout=WAIT_S)
    future.result(timeout=WAIT_S)
    assert not future.cancel()  # a finished call cannot be cancelled

    with pytest.raises(grpc.RpcError) as raised:
        stub.GetChargePoint(
            pb.GetChargePointRequest(id="cp-1", fail_with_code=CANCELLED), timeout=WAIT_S
        )
    assert raised.value.code() is grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("channel", cases("sync", "deadline"), indirect=True)
def test_a_deadline_ends_the_call_and_time_remaining_counts_down(channel: grpc.Channel) -> None:
    stub = _stub(channel)
    stream = stub.WatchStatus(SLOW_UPDATES, timeout=0.5)
    remaining = stream.time_remaining()
    assert remaining is not None and 0 < remaining <= 0.5
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    future = stub.GetChargePoint.future(POINT, timeout=WAIT_S)
    remaining = future.time_remaining()
    assert remaining is not None and 0 < remaining <= WAIT_S
    future.result(timeout=WAIT_S)
    assert stub.GetChargePoint.future(POINT).time_remaining() is None  # no deadline


def _failing_channel(wrapper: str, target: str) -> grpc.Channel:
    """A channel to ``target``, where no server listens: it fails a call at once, has tried to
    connect for a while and, if it has lanes, has none left (see ``has_no_lane``; lanes are
    dialled and dropped on their own timing, so up to ``TRIES`` channels are made)."""
    for attempt in range(1, TRIES + 1):
        channel = sync_channel(wrapper, target, channel_options=SOON)
        with pytest.raises(grpc.RpcError) as raised:
            _stub(channel).GetChargePoint(POINT, timeout=WAIT_S)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
        time.sleep(HAS_FAILED_S)
        for _ in range(int(SHORT_S / 0.01)):
            if has_no_lane(channel):
                return channel
            time.sleep(0.01)
        if attempt == TRIES:
            return channel
        channel.close()
    raise AssertionError("unreachable")


@pytest.mark.slow  # seconds each: a late server, a drain, or a subprocess
@pytest.mark.parametrize("wrapper", cases("sync", "wait_for_ready"))
def test_wait_for_ready_waits_for_a_server_that_starts_later(wrapper: str) -> None:
    port = free_port()
    channel = _failing_channel(wrapper, f"127.0.0.1:{port}")
    stub = _stub(channel)
    started: list[grpc.Server] = []
    late = threading.Timer(LATE_START_S, lambda: started.append(sync_server(port)[0]))
    try:
        late.start()
        waiting = []  # calls made one after another, meeting the channel as it changes
        for _ in range(WAITERS):
            waiting.append(
                stub.GetChargePoint.future(
                    POINT, timeout=LATE_START_S + WAIT_S, wait_for_ready=True
                )
            )
            time.sleep(WAITER_SPACING_S)
        assert [call.result().served_by for call in waiting] == ["late"] * WAITERS
    finally:
        late.cancel()
        if late.is_alive():
            late.join()
        channel.close()
        for server in started:
            server.stop(None).wait()


@pytest.mark.parametrize("channel", cases("sync", "close"), indirect=True)
def test_close_cancels_the_calls_in_flight(channel: grpc.Channel) -> None:
    stream = _stub(channel).WatchStatus(SLOW_UPDATES, timeout=SHORT_S)
    next(stream)
    channel.close()
    # A channel that lets it run ends it at its deadline instead: DEADLINE_EXCEEDED.
    with pytest.raises(grpc.RpcError) as raised:
        list(stream)
    assert raised.value.code() is grpc.StatusCode.CANCELLED


@pytest.mark.parametrize("wrapper", cases("sync", "connectivity"))
def test_connectivity_subscribe_and_channel_ready_future(wrapper: str, sync_pod: SyncPod) -> None:
    channel = sync_channel(wrapper, sync_pod.target)
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    try:
        channel.subscribe(states.put, try_to_connect=True)
        first = states.get(timeout=SHORT_S)
        # A fresh channel is IDLE; so is a routed one's own connectivity connection
        # (docs/channel_contract.md).
        assert first is grpc.ChannelConnectivity.IDLE
        seen = first
        while seen is not grpc.ChannelConnectivity.READY:
            seen = states.get(timeout=SHORT_S)
        channel.unsubscribe(states.put)
        grpc.channel_ready_future(channel).result(timeout=SHORT_S)
        # grpcio's polling thread looks again up to 0.2 s after the last unsubscribe, and dies
        # with "Channel closed!" if the channel closed meanwhile: let it end first.
        time.sleep(POLL_PERIOD_S)
    finally:
        channel.close()


@pytest.mark.parametrize("wrapper", cases("sync", "compression"))
def test_compression_for_the_channel_and_per_call(wrapper: str, sync_pod: SyncPod) -> None:
    channel = sync_channel(wrapper, sync_pod.target, compression=grpc.Compression.Gzip)
    try:
        stub = _stub(channel)
        assert stub.GetChargePoint(POINT, timeout=WAIT_S).id == "cp-1"
        deflated = stub.WatchStatus(
            pb.WatchStatusRequest(id="cp-1", updates=2),
            timeout=WAIT_S,
            compression=grpc.Compression.Deflate,
        )
        assert [update.sequence for update in deflated] == [0, 1]
    finally:
        channel.close()


@pytest.mark.parametrize("wrapper", cases("sync", "server_sees"))
def test_the_server_sees_the_callers_rpcs(wrapper: str) -> None:
    log = MethodLog()
    server, target = sync_server(log=log)
    channel = sync_channel(wrapper, target)
    try:
        _stub(channel).GetChargePoint(POINT, timeout=WAIT_S)
    finally:
        channel.close()
        server.stop(None).wait()
    asked = [method for method in log.methods if not method.startswith(HEALTH)]
    assert asked == [f"/{SERVICE_NAME}/GetChargePoint"]
    if wrapper in MULTI_CONNECTION:
        # Documented difference: each lane's connection is health-checked before calls use it.
        assert any(method.startswith(HEALTH) for method in log.methods)
    else:
        assert log.methods == asked  # only what the caller made
