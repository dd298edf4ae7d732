"""Make one call of each kind and collect what the client saw: metadata, status, responses."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import grpc

from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

CALL_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
OK, ABORT, RAISE = 0, grpc.StatusCode.FAILED_PRECONDITION.value[0], -1


@dataclass
class Seen:
    code: grpc.StatusCode
    initial: dict[str, Any]
    trailing: dict[str, Any]
    responses: list[Any]


def _requests(kind: str, fail: int) -> Any:
    if kind == "unary_unary":
        return pb.GetChargePointRequest(id="cp-1", fail_with_code=fail)
    if kind == "unary_stream":
        return pb.WatchStatusRequest(id="cp-1", updates=3, interval_ms=1, fail_with_code=fail)
    if kind == "stream_unary":
        return [pb.MeterValue(energy_wh=1.0), pb.MeterValue(energy_wh=2.0, fail_with_code=fail)]
    return [pb.SessionMessage(command="start"), pb.SessionMessage(command="x", fail_with_code=fail)]


_METHODS = {
    "unary_unary": "GetChargePoint",
    "unary_stream": "WatchStatus",
    "stream_unary": "UploadMeterValues",
    "stream_stream": "Session",
}


def call_sync(channel: grpc.Channel, kind: str, fail: int = OK, timeout: float = 10) -> Seen:
    method = getattr(pb_grpc.ChargePointsStub(channel), _METHODS[kind])
    request = _requests(kind, fail)
    arg = iter(request) if kind.startswith("stream") else request
    responses: list[Any] = []
    if kind.endswith("unary"):
        try:
            response, call = method.with_call(arg, timeout=timeout)
            responses.append(response)
        except grpc.RpcError as err:
            call = err
    else:
        call = method(arg, timeout=timeout)
        with contextlib.suppress(grpc.RpcError):
            responses.extend(call)
    return Seen(
        call.code(),
        dict(call.initial_metadata() or ()),
        dict(call.trailing_metadata() or ()),
        responses,
    )


async def call_aio(
    channel: grpc.aio.Channel, kind: str, fail: int = OK, timeout: float = 10
) -> Seen:
    method = getattr(pb_grpc.ChargePointsStub(channel), _METHODS[kind])
    request = _requests(kind, fail)
    arg = iter(request) if kind.startswith("stream") else request
    call = method(arg, timeout=timeout)
    responses: list[Any] = []
    try:
        if kind.endswith("unary"):
            responses.append(await call)
        else:
            # One by one, not a list comprehension: a stream that fails after some messages
            # keeps them (the comprehension's list is lost with the error), as call_sync's
            # list.extend keeps them.
            async for response in call:
                responses.append(response)
    except grpc.aio.AioRpcError:
        pass
    return Seen(
        await call.code(),
        # dict() of the pairs: grpcio < 1.63's aio Metadata.keys() yields pairs, not keys
        dict(tuple(await call.initial_metadata() or ())),
        dict(tuple(await call.trailing_metadata() or ())),
        responses,
    )
