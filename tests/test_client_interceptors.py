"""The observers, all four call kinds, against real loopback servers: the sync interceptor, the
sync channel wrapper (``observe_channel``) and the aio interceptors."""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from affinity_fixtures import (
    ENVOY_HEADERS,
    MODES,
    NO_WARMUP,
    SYNC_WRAPPERS,
    HeaderPod,
    call_twice,
    observe_sync,
)
from calls import ABORT, CALL_KINDS, OK, RAISE, call_sync
from conftest import IDENTITY, AioPod, SyncPod

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.aio import interceptors as aio_client
from grpc_balance_mw.interceptors import AffinityInterceptor, channel_of
from grpc_balance_mw.observed_channel import ObservedChannel, observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc


@pytest.fixture(params=MODES)
async def pod(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, str]]:
    if request.param != "aio":
        sync_pod = SyncPod()
        yield request.param, sync_pod.target
        sync_pod.stop()
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
        mode, target, kind, fail, registry=AffinityRegistry(NO_WARMUP)
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
            mode, plain.target, "unary_unary", OK, registry=AffinityRegistry(NO_WARMUP)
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
            mode, liar.target, "unary_unary", OK, registry=AffinityRegistry(NO_WARMUP)
        )
    finally:
        liar.stop()
    assert seen.code is grpc.StatusCode.OK
    snapshot = interceptor.detector.snapshot()
    assert (snapshot.unknown_calls, snapshot.malformed_calls) == (1, 1)


@pytest.mark.parametrize("mode", MODES)
async def test_envoy_headers_mark_the_target_l7_balanced(mode: str) -> None:
    envoy = HeaderPod(headers=ENVOY_HEADERS, identity=IDENTITY)
    registry = AffinityRegistry(NO_WARMUP)
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


def _settled(detector: Any, calls: int) -> Any:
    # a future's done-callback may run on grpc's thread just after result() returns
    for _ in range(100):
        if detector.snapshot().calls == calls:
            break
        time.sleep(0.01)
    return detector.snapshot()


@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_sync_future_and_cancelled_stream(sync_pod: SyncPod, wrapper: str) -> None:
    with grpc.insecure_channel(sync_pod.target) as bare:
        observed, watcher = observe_sync(
            bare, sync_pod.target, wrapper, registry=AffinityRegistry(NO_WARMUP)
        )
        stub = pb_grpc.ChargePointsStub(observed)
        future = stub.GetChargePoint.future(pb.GetChargePointRequest(id="cp-1"), timeout=10)
        assert future.result().served_by == IDENTITY.name
        meters = [pb.MeterValue(energy_wh=1.0), pb.MeterValue(energy_wh=2.0)]
        upload = stub.UploadMeterValues.future(iter(meters), timeout=10)
        assert upload.result().count == 2
        stream = stub.WatchStatus(
            pb.WatchStatusRequest(id="cp-1", updates=1000, interval_ms=5), timeout=10
        )
        assert next(stream).sequence == 0
        stream.cancel()
        with pytest.raises(grpc.RpcError) as raised:
            list(stream)
        assert raised.value.code() is grpc.StatusCode.CANCELLED
    snapshot = _settled(watcher.detector, 3)
    assert snapshot.calls == 3 and snapshot.pods[IDENTITY.name].calls == 3


def _call_plainly(channel: grpc.Channel, kind: str, fail: int) -> tuple[Any, Any]:
    """``method(request)`` without with_call: the response, or what the RpcError says."""
    stub = pb_grpc.ChargePointsStub(channel)
    try:
        if kind == "unary_unary":
            return stub.GetChargePoint(
                pb.GetChargePointRequest(id="cp-1", fail_with_code=fail), timeout=10
            ), None
        meters = [pb.MeterValue(energy_wh=1.0), pb.MeterValue(energy_wh=2.0, fail_with_code=fail)]
        return stub.UploadMeterValues(iter(meters), timeout=10), None
    except grpc.RpcError as error:
        return None, (error.code(), error.details(), dict(error.trailing_metadata() or ()))


@pytest.mark.parametrize("fail", [OK, ABORT, RAISE], ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", ["unary_unary", "stream_unary"])
@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_a_plain_call_is_recorded_and_unchanged(
    sync_pod: SyncPod, wrapper: str, kind: str, fail: int
) -> None:
    # the plain __call__ of unary responses is the channel wrapper's own, leaner, path
    with grpc.insecure_channel(sync_pod.target) as bare:
        observed, watcher = observe_sync(
            bare, sync_pod.target, wrapper, registry=AffinityRegistry(NO_WARMUP)
        )
        assert _call_plainly(observed, kind, fail) == _call_plainly(bare, kind, fail)
    snapshot = watcher.detector.snapshot()
    assert snapshot.calls == 1 and set(snapshot.pods) == {IDENTITY.name}


@pytest.mark.parametrize("fail", [OK, ABORT, RAISE], ids=["ok", "abort", "raise"])
def test_plain_unary_calls_run_as_grpcio_runs_them_and_any_other_multicallable_alike(
    sync_pod: SyncPod, fail: int
) -> None:
    """On grpcio's own multicallable the wrapper runs a plain unary call the way grpcio's
    ``__call__`` does (no call object built for ``with_call``); on any other (here an
    intercepted channel's) it falls back to ``with_call``. Both answer as the bare channel
    does and count the call."""
    from grpc_balance_mw._grpcio import blocking_unary_path as _core_path

    with grpc.insecure_channel(sync_pod.target) as bare:
        intercepted = grpc.intercept_channel(bare, _NoopInterceptor())
        assert _core_path(bare.unary_unary("/x.Y/Z")) is not None  # this grpcio's layout
        assert _core_path(intercepted.unary_unary("/x.Y/Z")) is None
        expected = _call_plainly(bare, "unary_unary", fail)
    for intercept in (False, True):
        inner = grpc.insecure_channel(sync_pod.target)
        if intercept:
            inner = grpc.intercept_channel(inner, _NoopInterceptor())
        options = ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
        # Closed before the pod stops: its probe's round (default options) ends with it.
        with observe(inner, options, target=sync_pod.target) as observed:
            assert _call_plainly(observed, "unary_unary", fail) == expected
            snapshot = observed.detector.snapshot()
            assert snapshot.calls == 1 and set(snapshot.pods) == {IDENTITY.name}


NOT_SERIALIZED = (grpc.StatusCode.INTERNAL, "Exception serializing request!")


@pytest.mark.parametrize("call", ["plain", "with_call", "future"])
@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_a_request_that_does_not_serialize_fails_alike_and_counts_as_unknown(
    sync_pod: SyncPod, wrapper: str, call: str
) -> None:

    def fail(channel: grpc.Channel) -> tuple[Any, str]:
        method = pb_grpc.ChargePointsStub(channel).GetChargePoint
        invoke: Callable[..., Any] = {
            "plain": method,
            "with_call": method.with_call,
            "future": lambda *a, **kw: method.future(*a, **kw).result(),
        }[call]
        with pytest.raises(grpc.RpcError) as raised:
            invoke("not a request", timeout=10)
        return raised.value.code(), raised.value.details()

    with grpc.insecure_channel(sync_pod.target) as bare:
        observed, watcher = observe_sync(
            bare, sync_pod.target, wrapper, registry=AffinityRegistry(NO_WARMUP)
        )
        assert fail(observed) == fail(bare) == NOT_SERIALIZED
    snapshot = _settled(watcher.detector, 1)
    assert (snapshot.calls, snapshot.unknown_calls) == (1, 1)


class _NoopInterceptor(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


def test_the_observed_channel_is_a_channel_that_interceptors_accept(sync_pod: SyncPod) -> None:
    states: list[grpc.ChannelConnectivity] = []
    with observe(
        grpc.insecure_channel(sync_pod.target),
        ObserveOptions(registry=AffinityRegistry(NO_WARMUP), lane="l0"),
        target=sync_pod.target,
    ) as observed:
        assert isinstance(observed, (grpc.Channel, ObservedChannel))
        assert "lane=l0" in repr(observed)
        observed.subscribe(states.append, try_to_connect=True)
        intercepted = grpc.intercept_channel(observed, _NoopInterceptor())
        for kind in CALL_KINDS:
            assert call_sync(intercepted, kind).code is grpc.StatusCode.OK
        observed.unsubscribe(states.append)
    assert states  # delegated to the inner channel, which reports its state at once
    assert observed.detector.snapshot().pods[IDENTITY.name].calls == 4
    with pytest.raises(ValueError, match="closed channel"):  # closed with the wrapper
        pb_grpc.ChargePointsStub(observed).GetChargePoint(pb.GetChargePointRequest(id="cp-1"))


class _PreRegistrationChannel(grpc.Channel):  # type: ignore[misc]
    """A channel whose methods predate grpcio's private ``_registered_method`` argument."""

    def __init__(self, inner: grpc.Channel) -> None:
        self.inner = inner

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> Any:
        return self.inner.unary_unary(method, request_serializer, response_deserializer)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> Any:
        return self.inner.unary_stream(method, request_serializer, response_deserializer)

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> Any:
        return self.inner.stream_unary(method, request_serializer, response_deserializer)

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> Any:
        return self.inner.stream_stream(method, request_serializer, response_deserializer)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self.inner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self.inner.unsubscribe(callback)

    def close(self) -> None:
        self.inner.close()


def test_generated_stubs_work_over_a_channel_without_registered_methods(sync_pod: SyncPod) -> None:
    # generated stubs pass _registered_method=True; this inner channel would reject it
    with observe(
        _PreRegistrationChannel(grpc.insecure_channel(sync_pod.target)),
        ObserveOptions(registry=AffinityRegistry(NO_WARMUP)),
        target=sync_pod.target,
    ) as observed:
        assert {call_sync(observed, kind).code for kind in CALL_KINDS} == {grpc.StatusCode.OK}
    assert observed.detector.snapshot().pods[IDENTITY.name].calls == 4


async def test_aio_cancelled_stream(aio_pod: AioPod) -> None:
    interceptor = aio_client.AffinityInterceptors(
        aio_pod.target, ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
    )
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
    interceptor = AffinityInterceptor(
        "127.0.0.1:1", ObserveOptions(registry=AffinityRegistry(NO_WARMUP), lane="l0")
    )
    for kind in (
        grpc.UnaryUnaryClientInterceptor,
        grpc.UnaryStreamClientInterceptor,
        grpc.StreamUnaryClientInterceptor,
        grpc.StreamStreamClientInterceptor,
    ):
        assert isinstance(interceptor, kind)
    assert "lane=l0" in repr(interceptor)


class _Passes(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(details, request)


def test_the_channel_of_each_call_is_found_call_after_call_and_none_is_kept_alive() -> None:
    """``channel_of`` remembers its last walk: calls alternating between two channels (one
    under a second interceptor) are each found on their own channel, and a dropped channel is
    collected (what is remembered is weakly referenced)."""
    found: list[int] = []

    class Finder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            found.append(id(channel_of(continuation)))
            return continuation(details, request)

    finder = Finder()
    first, second = grpc.insecure_channel("127.0.0.1:1"), grpc.insecure_channel("127.0.0.1:1")
    on_first = grpc.intercept_channel(first, finder).unary_unary("/s.S/M")
    on_second = grpc.intercept_channel(
        grpc.intercept_channel(second, finder), _Passes()
    ).unary_unary("/s.S/M")
    for call in (on_first, on_first, on_second, on_second, on_first, on_second):
        with pytest.raises(grpc.RpcError):  # nothing listens there: the call fails at once
            call(b"", timeout=1)
    a, b = id(first), id(second)
    assert found == [a, a, b, b, a, b]
    second.close()
    dropped = weakref.ref(second)
    del on_second, second, call
    gc.collect()
    assert dropped() is None
    first.close()
