"""The hand-encoded health messages both sides use instead of grpcio-health-checking: the same
bytes as the generated messages, and a real server understood (tests/test_health_service.py
serves them)."""

from __future__ import annotations

import grpc
import pytest
from conftest import SyncPod
from grpc_health.v1 import health_pb2
from hypothesis import given
from hypothesis import strategies as st

from grpc_balance_mw.health_check import (
    NOT_SERVING,
    SERVING,
    check_method,
    decode_request,
    decode_status,
    encode_request,
    encode_status,
)


@given(st.text(max_size=300))
def test_requests_are_the_generated_message_bytes(service: str) -> None:
    assert (
        encode_request(service)
        == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    )


@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_statuses_read_as_the_generated_message_says(status: int) -> None:
    assert (
        decode_status(health_pb2.HealthCheckResponse(status=status).SerializeToString()) == status
    )


@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_statuses_are_the_generated_message_bytes(status: int) -> None:
    assert (
        encode_status(status) == health_pb2.HealthCheckResponse(status=status).SerializeToString()
    )


@given(st.text(max_size=300), st.binary(max_size=20))
def test_requests_read_as_the_generated_message_says(service: str, unknown: bytes) -> None:
    message = health_pb2.HealthCheckRequest(service=service)
    # A newer client's fields (here field 2, length-delimited) are skipped.
    data = message.SerializeToString() + b"\x12" + bytes([len(unknown)]) + unknown
    assert decode_request(data) == service


def test_requests_that_are_no_message_are_refused() -> None:
    for garbage in (b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x0f"):
        with pytest.raises(ValueError):
            decode_request(garbage)


def test_unknown_fields_are_skipped_and_garbage_is_refused() -> None:
    extra = b"\x12\x03abc" + b"\x19" + bytes(8) + b"\x08\x02" + b"\x25" + bytes(4)
    assert decode_status(extra) == NOT_SERVING
    for garbage in (b"\x08", b"\x12\x05ab", b"\x0f"):
        with pytest.raises(ValueError):
            decode_status(garbage)


def test_a_real_health_service_answers_the_raw_check(sync_pod: SyncPod) -> None:
    with grpc.insecure_channel(sync_pod.target) as channel:
        status, call = check_method(channel).with_call("", timeout=5)
        assert status == SERVING
        assert ("x-balance-pod", "charge-points-7d9f-abcde") in call.initial_metadata()
        sync_pod.health.set_serving(False)
        assert check_method(channel)("", timeout=5) == NOT_SERVING
        with pytest.raises(grpc.RpcError) as raised:
            check_method(channel)("no.such.Service", timeout=5)
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
