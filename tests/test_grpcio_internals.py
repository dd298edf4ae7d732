"""The grpcio and OpenTelemetry internals the package reads (grpc_balance_mw/_grpcio.py,
grpc_balance_mw/aio/_grpcio.py): every fast path is live on the installed grpcio, and when a
release takes a private name away, the fallback still works and says so once.

A name is taken away with :func:`hide`: grpcio's own code still sees it, everyone else gets the
AttributeError a renamed attribute would give. scripts/test_grpcio_versions.sh runs this file on
the grpcio floor, the newest release and the newest pre-release.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from calls import OK, call_aio, call_sync
from conftest import IDENTITY, AioPod, SyncPod
from grpc import _channel as grpc_channel
from grpc import _interceptor as grpc_interceptor
from grpc.aio import _call as aio_call
from grpc.aio import _channel as aio_channel
from grpc.aio import _interceptor as aio_interceptor

from grpc_balance_mw import _grpcio
from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.aio import _grpcio as aio_grpcio
from grpc_balance_mw.aio.interceptors import affinity_interceptors as aio_interceptors
from grpc_balance_mw.aio.observed_channel import observe as observe_aio
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.interceptors import affinity_interceptors
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

NO_WARMUP = AffinityConfig(warmup_s=0)
LOGGER = "grpc_balance_mw._grpcio"


def options() -> ObserveOptions:
    return ObserveOptions(registry=AffinityRegistry(NO_WARMUP))


def expected_live(paths: dict[str, bool], aio: bool = False) -> dict[str, bool]:
    """Every path live, but the ones a grpcio of this age does not have yet."""
    release = _grpcio._release(grpc.__version__)
    newer = {"registered_method": _grpcio.REGISTERED_SINCE}
    if aio:
        newer["channel_target"] = _grpcio.AIO_TARGET_SINCE
    return {name: release >= newer.get(name, (0, 0)) for name in paths}


def hide(monkeypatch: pytest.MonkeyPatch, cls: type, name: str, owner: str = "grpc.") -> None:
    """``cls``'s attribute ``name`` as a release that renamed it would leave it: the owner's
    own modules (grpcio's) still read and write it, any other caller gets AttributeError."""
    store = f"_hidden{name}"

    def read(obj: Any) -> Any:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith(owner):
            return obj.__dict__[store] if store in obj.__dict__ else obj.__dict__[name]
        raise AttributeError(name)

    def write(obj: Any, value: Any) -> None:
        obj.__dict__[store] = value

    monkeypatch.setattr(cls, name, property(read, write), raising=False)


@pytest.fixture
def warnings(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """The fallback warnings logged during the test (each private name warns once a process:
    start from none warned)."""
    monkeypatch.setattr(_grpcio, "_warned", set())
    monkeypatch.setattr(_grpcio, "_BLOCKING_PATHS", {})
    monkeypatch.setattr(_grpcio, "_REGISTERED_BY_TYPE", {})
    caplog.set_level(logging.WARNING, LOGGER)

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == LOGGER]

    yield logged


def one_warning(logged: list[str], name: str) -> None:
    """``name``'s fallback warned exactly once, naming this grpcio."""
    hits = [message for message in logged if f"{name} is not where" in message]
    assert len(hits) == 1, logged
    assert f"(grpcio {grpc.__version__})" in hits[0]


# --- the fast paths are live ----------------------------------------------------------------


def test_every_sync_fast_path_is_live(sync_pod: SyncPod, warnings: Any) -> None:
    live = _grpcio.live_fast_paths(sync_pod.target)
    assert set(live) >= set(_grpcio.FAST_PATHS) - {
        "otel_instrumentor_instance",
        "otel_channel_parts",
    }
    assert live == expected_live(live)
    assert warnings() == []


async def test_every_aio_fast_path_is_live(aio_pod: AioPod, warnings: Any) -> None:
    live = await aio_grpcio.live_fast_paths(aio_pod.target)
    assert set(live) == set(aio_grpcio.FAST_PATHS)
    assert live == expected_live(live, aio=True)
    assert warnings() == []


# --- sync fallbacks ---------------------------------------------------------------------------


def test_without_call_state_the_pod_is_read_the_public_way(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    hide(monkeypatch, grpc_channel._Rendezvous, "_state")
    hide(monkeypatch, grpc_channel._InactiveRpcError, "_state")
    with grpc.insecure_channel(sync_pod.target) as channel:
        method = channel.unary_unary("/nowhere.Service/Missing")
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as raised:
                method(b"", timeout=10)
            headers, trailers = _grpcio.final_metadata(raised.value)
            assert (headers, trailers) == (
                raised.value.initial_metadata(),
                raised.value.trailing_metadata(),
            )
            assert _grpcio.headers_now(raised.value) is None  # what is lost: read without waiting
    one_warning(warnings(), "call._state")


def test_without_the_blocking_path_unary_calls_go_through_with_call(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    end = grpc_channel._end_unary_response_blocking

    def laid_out_otherwise(*args: Any, **kwargs: Any) -> Any:
        return end(*args, **kwargs)

    monkeypatch.setattr(grpc_channel, "_end_unary_response_blocking", laid_out_otherwise)
    with observe(grpc.insecure_channel(sync_pod.target), options()) as channel:
        for _ in range(2):  # two multicallables, one warning
            stub = pb_grpc.ChargePointsStub(channel)
            assert stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1"), timeout=10).id
        snapshot = channel.detector.snapshot()
    assert snapshot.calls == 2 and set(snapshot.pods) == {IDENTITY.name}
    one_warning(warnings(), "_channel._end_unary_response_blocking")


def test_a_channel_without_the_registered_flag_is_called_without_it(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    original = grpc_channel.Channel.unary_unary

    def unary_unary(
        self: Any, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> Any:
        return original(self, method, request_serializer, response_deserializer)

    monkeypatch.setattr(grpc_channel.Channel, "unary_unary", unary_unary)
    with observe(grpc.insecure_channel(sync_pod.target), options()) as channel:
        for _ in range(2):
            method = channel.unary_unary("/nowhere.Service/Missing", _registered_method=True)
            with pytest.raises(grpc.RpcError) as raised:
                method(b"", timeout=10)
            assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    if expected_live({"registered_method": True})["registered_method"]:
        one_warning(warnings(), "Channel.unary_unary(_registered_method=)")
    else:
        assert warnings() == []  # grpcio of that age never had the flag: nothing is lost


def test_without_the_interceptor_layout_calls_share_one_lane(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    hide(monkeypatch, grpc_interceptor._UnaryUnaryMultiCallable, "_thunk")
    interceptors = affinity_interceptors(sync_pod.target, options())
    with grpc.insecure_channel(sync_pod.target) as raw:
        channel = grpc.intercept_channel(raw, *interceptors)
        for _ in range(2):
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
    snapshot = interceptors[0].detector.snapshot()
    interceptors[0].close()
    assert snapshot.calls == 2 and set(snapshot.pods) == {IDENTITY.name}
    one_warning(warnings(), "_interceptor multicallable._thunk")


def test_without_the_channel_layout_observe_asks_for_the_target(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    hide(monkeypatch, grpc_channel.Channel, "_target")
    hide(monkeypatch, grpc_channel.Channel, "_channel")
    with grpc.insecure_channel(sync_pod.target) as raw:
        with pytest.raises(ConfigurationError, match="target"):
            observe(raw, options())
        assert _grpcio.core_channel(raw) is None
        assert _grpcio.core_channel(raw) is None
        with observe(raw, options(), target=sync_pod.target) as channel:
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
    one_warning(warnings(), "Channel._target")
    one_warning(warnings(), "Channel._channel.check_connectivity_state")


def test_without_otel_private_names_calls_are_still_observed(
    sync_pod: SyncPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    from opentelemetry import context
    from opentelemetry.instrumentation import grpc as otel_grpc
    from opentelemetry.instrumentation.grpc.grpcext import _interceptor as otel_interceptor

    monkeypatch.delattr(context, "_SUPPRESS_INSTRUMENTATION_KEY")
    assert _grpcio.suppress_keys() == _grpcio.suppress_keys() == ("suppress_instrumentation",)
    monkeypatch.setattr(otel_grpc, "GrpcInstrumentorClient", type("Renamed", (), {}))
    assert not _grpcio.instrumentor_active() and not _grpcio.instrumentor_active()
    hide(monkeypatch, otel_interceptor._InterceptorChannel, "_interceptor", otel_grpc.__name__)
    with grpc.insecure_channel(sync_pod.target) as raw:
        traced = otel_grpc.grpcext.intercept_channel(raw, otel_grpc.client_interceptor())
        assert _grpcio.instrumentation_parts(traced) is None
        with observe(traced, options(), target=sync_pod.target) as channel:
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
            assert channel.detector.snapshot().calls == 1
    one_warning(warnings(), "opentelemetry.context._SUPPRESS_INSTRUMENTATION_KEY")
    one_warning(warnings(), "GrpcInstrumentorClient._instance")
    one_warning(
        warnings(), "opentelemetry-instrumentation-grpc's _InterceptorChannel._channel/_interceptor"
    )


# --- aio fallbacks ----------------------------------------------------------------------------


async def test_without_the_core_call_an_aio_call_end_is_awaited(
    aio_pod: AioPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    hide(monkeypatch, aio_call.Call, "_cython_call")
    raw = grpc.aio.insecure_channel(aio_pod.target)
    async with observe_aio(raw, options(), target=aio_pod.target) as channel:
        for kind in ("unary_unary", "unary_stream"):
            assert (await call_aio(channel, kind, OK)).code is grpc.StatusCode.OK
        await aio_grpcio_settled()
        snapshot = channel.detector.snapshot()
    assert snapshot.calls == 2 and set(snapshot.pods) == {IDENTITY.name}
    one_warning(warnings(), "aio call._cython_call")


async def aio_grpcio_settled() -> None:
    from grpc_balance_mw.aio.call_end import settle_followers

    await settle_followers()


async def test_without_the_starter_task_a_call_still_ends_once(
    aio_pod: AioPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    hide(monkeypatch, aio_call._UnaryResponseMixin, "_call_response")
    hide(monkeypatch, aio_call._StreamResponseMixin, "_preparation")
    telemetry_options = ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
    interceptors = aio_interceptors(aio_pod.target, telemetry_options)
    async with grpc.aio.insecure_channel(aio_pod.target, interceptors=interceptors) as channel:
        for kind in ("unary_unary", "unary_stream"):
            assert (await call_aio(channel, kind, OK)).code is grpc.StatusCode.OK
    one_warning(warnings(), "aio call._call_response/_preparation")


async def test_without_the_aio_interceptor_layout_calls_are_observed_on_one_lane(
    aio_pod: AioPod, monkeypatch: pytest.MonkeyPatch, warnings: Any
) -> None:
    hide(monkeypatch, aio_interceptor.InterceptedUnaryUnaryCall, "_channel")
    hide(monkeypatch, aio_channel.Channel, "_unary_unary_interceptors")
    interceptors = aio_interceptors(aio_pod.target, options())
    async with grpc.aio.insecure_channel(aio_pod.target, interceptors=interceptors) as raw:
        for _ in range(2):
            assert (await call_aio(raw, "unary_unary", OK)).code is grpc.StatusCode.OK
        assert not aio_grpcio.has_interceptors(raw)  # the lists are out of reach
        async with observe_aio(raw, options(), target=aio_pod.target) as channel:
            assert (await call_aio(channel, "unary_unary", OK)).code is grpc.StatusCode.OK
            snapshot = channel.detector.snapshot()
    assert snapshot.calls == 1 and set(snapshot.pods) == {IDENTITY.name}
    one_warning(warnings(), "aio continuation.func.__self__._channel")
    one_warning(warnings(), "aio Channel._unary_unary_interceptors")


class _WithoutFlag:
    """An aio channel wrapper whose methods do not take ``_registered_method`` (as a wrapper
    written before grpcio had it)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._inner = channel

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None
    ) -> Any:
        return self._inner.unary_unary(method, request_serializer, response_deserializer)

    async def close(self, grace: float | None = None) -> None:
        await self._inner.close(grace)


async def test_aio_observe_calls_a_channel_without_the_registered_flag_without_it(
    aio_pod: AioPod, warnings: Any
) -> None:
    """Before: the flag was passed to any aio channel and a wrapper without it raised TypeError."""
    async with observe_aio(
        _WithoutFlag(grpc.aio.insecure_channel(aio_pod.target)),  # type: ignore[arg-type]
        options(),
        target=aio_pod.target,
    ) as channel:
        method = channel.unary_unary("/nowhere.Service/Missing", _registered_method=True)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await method(b"", timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert warnings() == []  # not grpcio's own channel: nothing of grpcio's is lost
