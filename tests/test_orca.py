"""ORCA load reports, encoded and decoded by hand, checked against protobuf's own runtime with
xds's OrcaLoadReport built from its descriptor (the same fields and numbers as the .proto)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from grpc_balance_mw.orca import (
    LoadReport,
    MalformedLoadReport,
    decode_load_report,
    encode_load_report,
)

_F = descriptor_pb2.FieldDescriptorProto


def _orca_message_class() -> Any:
    """xds.data.orca.v3.OrcaLoadReport, from a descriptor written out field by field."""
    file = descriptor_pb2.FileDescriptorProto(
        name="test_orca/orca_load_report.proto", package="xds.data.orca.v3", syntax="proto3"
    )
    report = file.message_type.add(name="OrcaLoadReport")
    doubles = {
        "cpu_utilization": 1,
        "mem_utilization": 2,
        "rps_fractional": 6,
        "eps": 7,
        "application_utilization": 9,
    }
    for name, number in doubles.items():
        report.field.add(name=name, number=number, type=_F.TYPE_DOUBLE, label=_F.LABEL_OPTIONAL)
    report.field.add(name="rps", number=3, type=_F.TYPE_UINT64, label=_F.LABEL_OPTIONAL)
    for name, number, entry in [
        ("request_cost", 4, "RequestCostEntry"),
        ("utilization", 5, "UtilizationEntry"),
        ("named_metrics", 8, "NamedMetricsEntry"),
    ]:
        nested = report.nested_type.add(name=entry)
        nested.options.map_entry = True
        nested.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
        nested.field.add(name="value", number=2, type=_F.TYPE_DOUBLE, label=_F.LABEL_OPTIONAL)
        report.field.add(
            name=name,
            number=number,
            type=_F.TYPE_MESSAGE,
            label=_F.LABEL_REPEATED,
            type_name=f".xds.data.orca.v3.OrcaLoadReport.{entry}",
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    descriptor = pool.FindMessageTypeByName("xds.data.orca.v3.OrcaLoadReport")
    make = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.22
    if make is None:  # the floor, 4.21
        return message_factory.MessageFactory(pool).GetPrototype(descriptor)
    return make(descriptor)


OrcaLoadReport = _orca_message_class()


def test_what_protobuf_encodes_decodes_to_the_same_figures() -> None:
    message = OrcaLoadReport(
        cpu_utilization=0.75,
        mem_utilization=0.5,
        rps=12,  # deprecated, unknown to this module: skipped
        rps_fractional=123.25,
        eps=1.5,
        application_utilization=0.6,
        named_metrics={"in_flight": 7.0, "connections": 42.0},
        utilization={"gpu": 0.25},
        request_cost={"db": 3.0},
    )
    report = decode_load_report(message.SerializeToString())
    assert report == LoadReport(
        cpu_utilization=0.75,
        mem_utilization=0.5,
        application_utilization=0.6,
        rps_fractional=123.25,
        eps=1.5,
        request_cost={"db": 3.0},
        utilization={"gpu": 0.25},
        named_metrics={"in_flight": 7.0, "connections": 42.0},
    )
    assert report.load == 0.6  # the application's figure before the CPU's, as A58 says


def test_what_this_module_encodes_protobuf_parses_to_the_same_figures() -> None:
    report = LoadReport(
        cpu_utilization=0.9,
        rps_fractional=50.0,
        named_metrics={"in_flight": 3.0, "connections": 12.0, "é": 1.0},
    )
    message = OrcaLoadReport.FromString(encode_load_report(report))
    assert message.cpu_utilization == 0.9
    assert message.rps_fractional == 50.0
    assert message.application_utilization == 0.0
    assert dict(message.named_metrics) == {"in_flight": 3.0, "connections": 12.0, "é": 1.0}
    assert decode_load_report(encode_load_report(report)) == report
    assert report.load == 0.9


def test_an_empty_trailer_is_a_report_of_nothing() -> None:
    assert encode_load_report(LoadReport()) == b""
    assert decode_load_report(b"") == LoadReport()


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    known = encode_load_report(LoadReport(cpu_utilization=0.5))
    varint = bytes([10 << 3 | 0]) + b"\x96\x01"
    fixed64 = bytes([11 << 3 | 1]) + b"\x00" * 8
    length = bytes([12 << 3 | 2, 3]) + b"abc"
    fixed32 = bytes([13 << 3 | 5]) + b"\x00" * 4
    assert decode_load_report(varint + fixed64 + known + length + fixed32).cpu_utilization == 0.5


def _double(number: int, value: float) -> bytes:
    return bytes([number << 3 | 1]) + struct.pack("<d", value)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x09\x00\x00", "runs past the end"),  # cpu_utilization cut short
        (b"\x08\x01", "wire type 0"),  # cpu_utilization as a varint
        (b"\x42\x05ab", "runs past the end"),  # a named_metrics entry cut short
        (b"\x41" + b"\x00" * 8, "map entry"),  # named_metrics as a double
        (b"\x42\x04\x0a\x02\xff\xfe", "not UTF-8"),
        (b"\x00", "field number 0"),
        (b"\xff" * 11, "varint"),
        (bytes([10 << 3 | 3]), "groups"),
        (_double(1, math.nan), "not a finite number"),
        (_double(9, -0.5), "not a finite number"),
        (_double(1, math.inf), "not a finite number"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_what_is_no_report_is_refused_with_a_clear_error(data: bytes, says: str) -> None:
    with pytest.raises(MalformedLoadReport, match=says):
        decode_load_report(data)
    assert issubclass(MalformedLoadReport, ValueError)
