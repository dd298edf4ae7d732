"""The client side of ``grpc.health.v1.Health/Check``, without generated code.

The probe, the balanced channel's lanes, the dial-per-request predial and the doctor each ask a
fresh connection for its health and read which pod answered. Two fields of the wire format are
all they need (the request's ``service`` string, the response's ``status`` enum), so the client
side needs neither grpcio-health-checking nor protobuf: an application pinned to an old grpcio
keeps its pin (grpcio-health-checking N requires grpcio >= N). The server side,
:func:`grpc_balance_mw.server.add_health`, does use grpcio-health-checking (the ``server`` extra).
"""

from __future__ import annotations

from typing import Any

from grpc_balance_mw._suppress import suppressed

__all__ = [
    "CHECK_METHOD",
    "MALFORMED",
    "MAX_REPLY_BYTES",
    "NOT_SERVING",
    "OVERSIZED",
    "SERVING",
    "UNKNOWN",
    "check_method",
    "decode_status",
    "encode_request",
    "read_status",
]

CHECK_METHOD = "/grpc.health.v1.Health/Check"
#: ``grpc.health.v1.HealthCheckResponse.ServingStatus``.
UNKNOWN, SERVING, NOT_SERVING, SERVICE_UNKNOWN = 0, 1, 2, 3
#: What :func:`read_status` answers for a reply that is no ``HealthCheckResponse``, and for one
#: longer than :data:`MAX_REPLY_BYTES` (neither is a ServingStatus).
MALFORMED, OVERSIZED = -1, -2
#: A ``HealthCheckResponse`` is 2 bytes (a status) plus whatever fields a newer server adds;
#: a reply longer than this comes from something that is not a health service worth believing.
MAX_REPLY_BYTES = 1024
_STATUS_TAG = 0x08  # field 1, varint
_SERVICE_TAG = 0x0A  # field 1, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """A ``HealthCheckRequest`` for ``service`` ("" asks about the server as a whole)."""
    data = service.encode("utf-8")
    return _SERVICE_TAG.to_bytes(1, "big") + _varint(len(data)) + data if data else b""


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, offset


def decode_status(data: bytes) -> int:
    """The ``status`` of a ``HealthCheckResponse`` (UNKNOWN when absent); other fields are
    skipped as protobuf would; ValueError for bytes that are no protobuf message."""
    status = UNKNOWN
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _read_varint(data, offset)
            if field == 1:
                status = value
        elif wire == 2:
            length, offset = _read_varint(data, offset)
            offset += length
        elif wire == 1:
            offset += 8
        elif wire == 5:
            offset += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if offset > len(data):
            raise ValueError("truncated field")
    return status


def read_status(data: bytes) -> int:
    """:func:`decode_status` that never raises: :data:`OVERSIZED` for a reply longer than
    :data:`MAX_REPLY_BYTES` (not parsed at all), :data:`MALFORMED` for bytes that are no
    protobuf message. For checks made again and again (a balanced channel's lanes and scouts):
    grpcio logs a traceback for every response whose deserializer raises."""
    if len(data) > MAX_REPLY_BYTES:
        return OVERSIZED
    try:
        return decode_status(data)
    except ValueError:
        return MALFORMED


class _Unseen:
    """A multicallable whose calls start with OpenTelemetry's instrumentation suppressed: the
    package's own health checks (lanes, scouts, the probe, the doctor) are not the user's calls
    and must not bill the user's tracing (an idle balanced channel checks several times a
    second). The suppression holds while the call is started, which is when both grpc's and
    grpc.aio's interceptors read the context."""

    __slots__ = ("_inner",)

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with suppressed():
            return self._inner(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        with suppressed():
            return self._inner.future(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        with suppressed():
            return self._inner.with_call(*args, **kwargs)


def check_method(channel: Any, *, lenient: bool = False) -> Any:
    """``Health/Check`` on ``channel`` (sync or aio): call it with a service name ("" for the
    server as a whole); it answers the status number. ``lenient``: a reply that is no health
    status answers :data:`MALFORMED` or :data:`OVERSIZED` (:func:`read_status`) instead of
    failing the call with INTERNAL. Its calls make no OpenTelemetry span."""
    return _Unseen(
        channel.unary_unary(
            CHECK_METHOD,
            request_serializer=encode_request,
            response_deserializer=read_status if lenient else decode_status,
        )
    )
