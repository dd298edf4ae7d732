"""The aio balanced channel's call path: a call sent once is grpc.aio's own call object, with
no interceptor machinery around it; its lane is observed and given back from the call's
done-callback, once, whichever way the call ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc.aio import _call as aio_call

from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw.aio.interceptors import has_interceptors
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc


async def _active(channel: balance_aio.BalancedChannel) -> None:
    for _ in range(500):  # bounded: 10 s
        if any(lane.is_available() for lane in channel.pool.lanes):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no lane became active: {channel.pool!r}")


async def _settled(channel: balance_aio.BalancedChannel) -> None:
    for _ in range(500):
        if all(lane.in_flight == 0 for lane in channel.pool.lanes):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"calls still held their lanes: {channel.pool!r}")


@pytest.mark.parametrize("fail", [False, True], ids=["ok", "failed"])
async def test_a_call_is_grpc_aio_own_call_observed_and_released_once(
    aio_pod: object, fail: bool
) -> None:
    target = aio_pod.target  # type: ignore[attr-defined]
    channel = balance_aio.balanced_channel(target, lanes=1, observe=ObserveOptions(expected_pods=1))
    try:
        await _active(channel)
        lane = next(lane for lane in channel.pool.lanes if lane.is_available())
        assert not has_interceptors(lane.connection.channel)
        assert lane.connection.observer is not None  # observed from the done-callback
        calls_before = lane.calls
        rpc = pb_grpc.ChargePointsStub(channel).GetChargePoint  # type: ignore[no-untyped-call]
        code = grpc.StatusCode.NOT_FOUND.value[0] if fail else 0
        call = rpc(pb.GetChargePointRequest(id="cp-1", fail_with_code=code), timeout=10)
        assert type(call) is aio_call.UnaryUnaryCall  # no intercepted call, no task of ours
        if fail:
            with pytest.raises(grpc.aio.AioRpcError):
                await call
        else:
            assert (await call).id == "cp-1"
        await _settled(channel)
        assert lane.calls == calls_before + 1
        assert lane.in_flight == 0  # given back exactly once (a second release would go below)
        snapshot = channel.detector.snapshot()
        assert snapshot.calls + snapshot.warmup_calls >= 1  # the observer saw the call
    finally:
        await channel.close()
