"""ORCA load reports (gRFC A51): what a pod says about its own load, per call.

A pod sends an ``OrcaLoadReport`` (``xds.data.orca.v3``) in the ``endpoint-load-metrics-bin``
trailer of a call; a client that reads it sees the load every client puts on that pod, where its
own calls in flight show only its own share. gRPC's ``weighted_round_robin`` (gRFC A58) weighs
endpoints by these reports; so does this package's picker.

The message is encoded and decoded here by hand (six scalar fields and three maps), so neither
side needs the xds protos. Decoding skips fields it does not know, as protobuf does, and refuses
a message it cannot parse with :class:`MalformedLoadReport`: a report is telemetry, and a caller
that gets the error drops the report, never the call.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from grpc_balance_mw.errors import BalanceError

__all__ = [
    "GRPCIO_TRAILER_KEY",
    "TRAILER_KEY",
    "TRAILER_KEYS",
    "LoadReport",
    "MalformedLoadReport",
    "decode_load_report",
    "encode_load_report",
]

#: The trailer ORCA's per-call reports travel in (binary metadata: grpcio base64s it).
TRAILER_KEY = "endpoint-load-metrics-bin"
#: The same report under a name a grpcio client can read: gRPC core takes
#: ``endpoint-load-metrics-bin`` out of the trailers it receives (it parses it for its own load
#: balancing policies and never publishes it to the application:
#: ``EndpointLoadMetricsBinMetadata::kPublishToApp = false``), so a grpcio client never sees
#: :data:`TRAILER_KEY` in ``call.trailing_metadata()``. This package's server half sends both
#: (the standard one for Envoy and gRPC's own ``weighted_round_robin`` in other languages); its
#: client half reads this one.
GRPCIO_TRAILER_KEY = "x-balance-load-metrics-bin"
#: The keys a client reads a report from, in order.
TRAILER_KEYS = (GRPCIO_TRAILER_KEY, TRAILER_KEY)

#: Field numbers of OrcaLoadReport.
_CPU, _MEM, _RPS, _REQUEST_COST, _UTILIZATION, _RPS_FRACTIONAL, _EPS, _NAMED, _APPLICATION = range(
    1, 10
)
_DOUBLES = {
    _CPU: "cpu_utilization",
    _MEM: "mem_utilization",
    _RPS_FRACTIONAL: "rps_fractional",
    _EPS: "eps",
    _APPLICATION: "application_utilization",
}
_MAPS = {_REQUEST_COST: "request_cost", _UTILIZATION: "utilization", _NAMED: "named_metrics"}
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_DOUBLE = struct.Struct("<d")
_EMPTY: Mapping[str, float] = MappingProxyType({})


def _no_figures() -> Mapping[str, float]:
    return _EMPTY


class MalformedLoadReport(BalanceError, ValueError):
    """A trailer named ``endpoint-load-metrics-bin`` held no OrcaLoadReport."""


@dataclass(frozen=True)
class LoadReport:
    """One OrcaLoadReport. Utilizations are fractions of the pod's capacity (1.0: full; above
    1.0 when it queues); ``rps_fractional`` and ``eps`` are the pod's queries and errors per
    second; ``named_metrics`` carries what ORCA has no field for (this package's server half
    sends ``in_flight`` and ``connections``)."""

    cpu_utilization: float = 0.0
    mem_utilization: float = 0.0
    application_utilization: float = 0.0
    rps_fractional: float = 0.0
    eps: float = 0.0
    request_cost: Mapping[str, float] = field(default_factory=_no_figures)
    utilization: Mapping[str, float] = field(default_factory=_no_figures)
    named_metrics: Mapping[str, float] = field(default_factory=_no_figures)

    @property
    def load(self) -> float:
        """The utilization A58 weighs by: the application's own figure if it sends one, else
        the CPU's."""
        return self.application_utilization or self.cpu_utilization


def encode_load_report(report: LoadReport) -> bytes:
    """The wire form of ``report``: fields left at 0 (or empty) are not sent, as protobuf does."""
    out = bytearray()
    for number, name in _DOUBLES.items():
        value = getattr(report, name)
        if value:
            out += _key(number, _FIXED64) + _DOUBLE.pack(value)
    for number, name in _MAPS.items():
        for key, value in getattr(report, name).items():
            name_bytes = key.encode()
            entry = _key(1, _LENGTH) + _varint(len(name_bytes)) + name_bytes
            entry += _key(2, _FIXED64) + _DOUBLE.pack(value)
            out += _key(number, _LENGTH) + _varint(len(entry)) + entry
    return bytes(out)


def decode_load_report(data: bytes) -> LoadReport:
    """Parse one OrcaLoadReport.

    Raises:
        MalformedLoadReport: truncated or not protobuf, a wire type its field cannot have, a
            map key that is not UTF-8, or a value that is not a finite number >= 0.
    """
    doubles: dict[str, Any] = {}
    maps: dict[str, dict[str, float]] = {}
    position = 0
    while position < len(data):
        number, wire, position = _read_key(data, position)
        if number in _DOUBLES:
            value, position = _read_double(data, position, wire)
            doubles[_DOUBLES[number]] = _checked(value, _DOUBLES[number])
        elif number in _MAPS:
            if wire != _LENGTH:
                raise MalformedLoadReport(f"field {number} must be a map entry, wire type {wire}")
            entry, position = _read_bytes(data, position)
            key, value = _read_entry(entry)
            maps.setdefault(_MAPS[number], {})[key] = _checked(value, f"{_MAPS[number]}[{key}]")
        else:
            position = _skip(data, position, wire)
    for name, values in maps.items():
        doubles[name] = MappingProxyType(values)
    return LoadReport(**doubles)


def _checked(value: float, name: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise MalformedLoadReport(f"{name} = {value}: not a finite number >= 0")
    return value


def _read_entry(entry: bytes) -> tuple[str, float]:
    key, value, position = "", 0.0, 0
    while position < len(entry):
        number, wire, position = _read_key(entry, position)
        if number == 1 and wire == _LENGTH:
            raw, position = _read_bytes(entry, position)
            try:
                key = raw.decode()
            except UnicodeDecodeError as error:
                raise MalformedLoadReport("a map key is not UTF-8") from error
        elif number == 2:
            value, position = _read_double(entry, position, wire)
        else:
            position = _skip(entry, position, wire)
    return key, value


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise MalformedLoadReport("a varint runs past the end or past 64 bits")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _read_key(data: bytes, position: int) -> tuple[int, int, int]:
    key, position = _read_varint(data, position)
    if key >> 3 == 0:
        raise MalformedLoadReport("field number 0")
    return key >> 3, key & 7, position


def _read_double(data: bytes, position: int, wire: int) -> tuple[float, int]:
    if wire != _FIXED64:
        raise MalformedLoadReport(f"a double field with wire type {wire}")
    if position + 8 > len(data):
        raise MalformedLoadReport("a double runs past the end")
    return _DOUBLE.unpack_from(data, position)[0], position + 8


def _read_bytes(data: bytes, position: int) -> tuple[bytes, int]:
    size, position = _read_varint(data, position)
    if position + size > len(data):
        raise MalformedLoadReport("a length-delimited field runs past the end")
    return data[position : position + size], position + size


def _skip(data: bytes, position: int, wire: int) -> int:
    if wire == _VARINT:
        return _read_varint(data, position)[1]
    if wire == _FIXED64:
        end = position + 8
    elif wire == _FIXED32:
        end = position + 4
    elif wire == _LENGTH:
        return _read_bytes(data, position)[1]
    else:
        raise MalformedLoadReport(f"wire type {wire} (groups are not protobuf 3)")
    if end > len(data):
        raise MalformedLoadReport("a fixed-size field runs past the end")
    return end
