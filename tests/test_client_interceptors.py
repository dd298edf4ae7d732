"""The observing interceptors, sync and aio, all four call kinds, against real loopback servers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest
from affinity_fixtures import ENVOY_HEADERS, HeaderPod, call_twice
from calls import ABORT, CALL_KINDS, OK, RAISE
from conftest import IDENTITY, AioPod, SyncPod

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.aio import client as aio_client
from grpc_balance_mw.client import AffinityInterceptor, affinity_interceptors
from grpc_balance_mw.demo.v1 import charge_points_pb2 as pb
from grpc_balance_mw.demo.v1 import charge_points_pb2_grpc as pb_grpc

MODES = ("sync", "aio")


@pytest.fixture(params=MODES)
async def pod(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    if request.param == "sync":
        sync_pod = SyncPod()
        yield "sync", sync_pod.target
        sync_pod.server.stop(None).wait()
    else:
        aio_pod = await AioPod().start()
        yield "aio", aio_pod.target
        await aio_pod.server.stop(None)


@pytest.mark.parametrize("fail", [OK, ABORT, RAISE], ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_records_the_pod_and_changes_nothing(
    pod: tuple[str, str], kind: str, fail: int
) -> None:
    mode, target = pod
    bare, seen, interceptor = await call_twice(
        mode, target, kind, fail, registry=AffinityRegistry()
    )
    assert (seen.code, seen.responses) == (bare.code, bare.responses)
    assert (seen.initial, seen.trailing) == (bare.initial, bare.trailing)
    snapshot = interceptor.detector.snapshot()
    assert snapshot.calls == 1 and snapshot.unknown_calls == 0
    assert set(snapshot.pods) == {IDENTITY.name}


@pytest.mark.parametrize("mode", MODES)
async def test_a_server_without_identity_counts_as_unknown(mode: str) -> None:
    plain = HeaderPod()
    try:
        _, seen, interceptor = await call_twice(
            mode, plain.target, "unary_unary", OK, registry=AffinityRegistry()
        )
    finally:
        plain.stop()
    assert seen.code is grpc.StatusCode.OK
    snapshot = interceptor.detector.snapshot()
    assert (snapshot.calls, snapshot.unknown_calls, snapshot.malformed_calls) == (1, 1, 0)


@pytest.mark.parametrize("mode", MODES)
async def test_a_malformed_pod_header_is_unknown_and_counted(mode: str) -> None:
    liar = HeaderPod(headers=[("x-balance-pod", "pod-a"), ("x-balance-pod", "pod-b")])
    try:
        _, seen, interceptor = await call_twice(
            mode, liar.target, "unary_unary", OK, registry=AffinityRegistry()
        )
    finally:
        liar.stop()
    assert seen.code is grpc.StatusCode.OK
    snapshot = interceptor.detector.snapshot()
    assert (snapshot.unknown_calls, snapshot.malformed_calls) == (1, 1)


@pytest.mark.parametrize("mode", MODES)
async def test_envoy_headers_mark_the_target_l7_balanced(mode: str) -> None:
    envoy = HeaderPod(headers=ENVOY_HEADERS, identity=IDENTITY)
    registry = AffinityRegistry()
    try:
        for _ in range(30):  # min_samples + dwell_calls
            _, _, interceptor = await call_twice(
                mode, envoy.target, "unary_unary", OK, registry=registry, expected_pods=3
            )
    finally:
        envoy.stop()
    snapshot = interceptor.detector.snapshot()
    assert snapshot.l7_share == 1.0 and set(snapshot.pods) == {IDENTITY.name}
    assert snapshot.state is AffinityState.L7_BALANCED


def test_sync_future_and_cancelled_stream(sync_pod: SyncPod) -> None:
    interceptor = affinity_interceptors(sync_pod.target, registry=AffinityRegistry())
    with grpc.insecure_channel(sync_pod.target) as bare:
        stub = pb_grpc.ChargePointsStub(grpc.intercept_channel(bare, *interceptor))
        future = stub.GetChargePoint.future(pb.GetChargePointRequest(id="cp-1"), timeout=10)
        assert future.result().served_by == IDENTITY.name
        stream = stub.WatchStatus(
            pb.WatchStatusRequest(id="cp-1", updates=1000, interval_ms=5), timeout=10
        )
        assert next(stream).sequence == 0
        stream.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() is grpc.StatusCode.CANCELLED
    detector = interceptor[0].detector
    # the done-callback of the future may run on grpc's thread just after result() returns
    for _ in range(100):
        if detector.snapshot().calls == 2:
            break
        time.sleep(0.01)
    snapshot = detector.snapshot()
    assert snapshot.calls == 2 and snapshot.pods[IDENTITY.name].calls == 2


async def test_aio_cancelled_stream(aio_pod: AioPod) -> None:
    interceptor = aio_client.AffinityInterceptor(aio_pod.target, registry=AffinityRegistry())
    assert len(interceptor.interceptors) == 4
    async with grpc.aio.insecure_channel(
        aio_pod.target, interceptors=interceptor.interceptors
    ) as channel:
        call = pb_grpc.ChargePointsStub(channel).WatchStatus(
            pb.WatchStatusRequest(id="cp-1", updates=1000, interval_ms=5), timeout=10
        )
        assert (await call.read()).sequence == 0
        call.cancel()
        await interceptor.settle()
        assert await call.code() is grpc.StatusCode.CANCELLED
    assert interceptor.detector.snapshot().pods[IDENTITY.name].calls == 1


def test_sync_interceptor_is_one_object_for_all_kinds() -> None:
    interceptor = AffinityInterceptor("127.0.0.1:1", registry=AffinityRegistry(), lane="l0")
    for kind in (
        grpc.UnaryUnaryClientInterceptor,
        grpc.UnaryStreamClientInterceptor,
        grpc.StreamUnaryClientInterceptor,
        grpc.StreamStreamClientInterceptor,
    ):
        assert isinstance(interceptor, kind)
    assert "lane=l0" in repr(interceptor)
