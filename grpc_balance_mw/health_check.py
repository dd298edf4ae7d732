"""``grpc.health.v1.Health`` messages without generated code, and the client side of ``Check``.

The probe, the balanced channel's lanes, the dial-per-request predial and the doctor each ask a
fresh connection for its health and read which pod answered; the server side,
:func:`grpc_balance_mw.server.add_health`, answers them. Each message has one field that
matters (the request's ``service`` string, the response's ``status`` enum), so neither side
needs grpcio-health-checking nor protobuf: an application pinned to an old grpcio keeps its pin
(grpcio-health-checking N requires grpcio >= N).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from grpc_balance_mw._suppress import suppressed

__all__ = [
    "CHECK_METHOD",
    "HEALTH_SERVICE",
    "MALFORMED",
    "MAX_REPLY_BYTES",
    "NOT_SERVING",
    "OVERSIZED",
    "SERVICE_UNKNOWN",
    "SERVING",
    "UNKNOWN",
    "WATCH_METHOD",
    "check_method",
    "decode_request",
    "decode_status",
    "encode_request",
    "encode_status",
    "read_status",
]

HEALTH_SERVICE = "grpc.health.v1.Health"
CHECK_METHOD = f"/{HEALTH_SERVICE}/Check"
WATCH_METHOD = f"/{HEALTH_SERVICE}/Watch"
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


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Each (field number, value) of a protobuf message: varints as ints, length-delimited
    fields as bytes; fixed-width fields are skipped. ValueError for bytes that are no message."""
    offset = 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _read_varint(data, offset)
            yield field, value
            continue
        if wire == 2:
            length, offset = _read_varint(data, offset)
            if offset + length > len(data):
                raise ValueError("truncated field")
            yield field, data[offset : offset + length]
            offset += length
        elif wire in (1, 5):
            offset += 8 if wire == 1 else 4
            if offset > len(data):
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire}")


def decode_status(data: bytes) -> int:
    """The ``status`` of a ``HealthCheckResponse`` (UNKNOWN when absent); other fields are
    skipped as protobuf would; ValueError for bytes that are no protobuf message."""
    status = UNKNOWN
    for field, value in _fields(data):
        if field == 1 and isinstance(value, int):
            status = value
    return status


def encode_status(status: int) -> bytes:
    """A ``HealthCheckResponse`` with ``status`` (UNKNOWN, the default, is no bytes at all)."""
    return _STATUS_TAG.to_bytes(1, "big") + _varint(status) if status else b""


def decode_request(data: bytes) -> str:
    """The ``service`` of a ``HealthCheckRequest`` ("" when absent); ValueError for bytes that
    are no protobuf message or a name that is not UTF-8 (protobuf refuses both too)."""
    service = b""
    for field, value in _fields(data):
        if field == 1 and isinstance(value, bytes):
            service = value
    return service.decode("utf-8")


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
