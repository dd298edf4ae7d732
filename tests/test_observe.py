"""``observe()``, the one way in, sync and aio: the target learned from the channel, every call
kind observed without changing it, calls that end before any header, instrumented channels."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from calls import ABORT, CALL_KINDS, OK, RAISE, call_aio, call_sync
from conftest import IDENTITY, AioPod, SyncPod
from leak_fixtures import server_with_own_workers

from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.aio.observed_channel import ObservedChannel as AioObservedChannel
from grpc_balance_mw.aio.observed_channel import observe as observe_aio
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.interceptors import affinity_interceptors
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions, build_observer, channel_target

NO_WARMUP = AffinityConfig(warmup_s=0)


class _Passthrough(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def intercept_unary_unary(
        self, continuation: object, details: object, request: object
    ) -> object:
        return continuation(details, request)  # type: ignore[operator]


@pytest.mark.parametrize(
    "target", ["127.0.0.1:5", "dns:///charge-points.ev.svc:50051", "ipv4:127.0.0.1:7,127.0.0.2:7"]
)
async def test_the_target_is_read_back_from_sync_and_aio_channels(target: str) -> None:
    sync = grpc.insecure_channel(target)
    try:
        assert channel_target(sync) == target
        assert channel_target(grpc.intercept_channel(sync, _Passthrough())) == target
    finally:
        sync.close()
    aio = grpc.aio.insecure_channel(target)
    try:
        # grpcio before 1.5x keeps no target on an aio channel: observe() then asks for target=.
        knows = hasattr(aio._channel, "target")
        assert channel_target(aio) == (target if knows else None)
    finally:
        await aio.close()


def test_a_channel_whose_target_is_unknown_must_be_told() -> None:
    class Homemade:
        """A channel of the application's own, with no grpcio core channel inside."""

    with pytest.raises(ConfigurationError, match="target="):
        observe(Homemade())  # type: ignore[arg-type]


def test_an_object_that_is_no_grpc_channel_has_no_target() -> None:
    class Lookalike:
        _channel = "not a core channel"

    assert channel_target(Lookalike()) is None
    assert channel_target(object()) is None


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "3"])
def test_options_reject_a_bad_pod_count(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="expected_pods"):
        ObserveOptions(expected_pods=bad)  # type: ignore[arg-type]


def test_options_but_changes_one_field() -> None:
    options = ObserveOptions(expected_pods=3)
    assert options.but(lane="lane-a") == ObserveOptions(expected_pods=3, lane="lane-a")


def _aio_observed(target: str, registry: AffinityRegistry) -> AioObservedChannel:
    observer = build_observer(target, ObserveOptions(registry=registry))
    return AioObservedChannel(grpc.aio.insecure_channel(target), observer)


@pytest.mark.parametrize("fail", [OK, ABORT, RAISE], ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_aio_wrapper_counts_each_call_kind_and_changes_nothing(
    aio_pod: AioPod, kind: str, fail: int
) -> None:
    async with grpc.aio.insecure_channel(aio_pod.target) as bare:
        expected = await call_aio(bare, kind, fail)
    async with _aio_observed(aio_pod.target, AffinityRegistry(NO_WARMUP)) as channel:
        seen = await call_aio(channel, kind, fail)
        snapshot = channel.detector.snapshot()
    assert (seen.code, seen.responses) == (expected.code, expected.responses)
    assert (seen.initial, seen.trailing) == (expected.initial, expected.trailing)
    assert snapshot.calls == 1 and set(snapshot.pods) == {IDENTITY.name}


@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_aio_wrapper_returns_a_missing_method_status_in_time(
    aio_pod: AioPod, kind: str
) -> None:
    async with _aio_observed(aio_pod.target, AffinityRegistry(NO_WARMUP)) as channel:
        make = getattr(channel, kind)("/nowhere.Service/Missing")
        request = iter([b""]) if kind.startswith("stream") else b""
        for _ in range(2):  # and the channel still works afterwards
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                call = make(request, timeout=2)
                if kind.endswith("unary"):
                    await asyncio.wait_for(call, 5)
                else:
                    await asyncio.wait_for(_drain(call), 5)
            assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
        snapshot = channel.detector.snapshot()
    # The server named itself in the trailers of the UNIMPLEMENTED status: the call still counts.
    assert snapshot.calls == 2


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


_POD_A = PodIdentity("pod-a", "10.0.0.1", "ev")
_POD_B = PodIdentity("pod-b", "10.0.0.2", "ev")
#: Per request: the trailers a pod that names itself pod-a in its headers sends.
_TRAILERS = {b"a": _POD_A.to_metadata(), b"b": _POD_B.to_metadata(), b"-": ()}
#: Calls like one seen before, then trailers that contradict the headers, name nothing, agree.
_SEQUENCE = [b"a", b"a", b"a", b"b", b"-", b"a", b"b", b"b", b"a", b"-"]


@pytest.fixture
def trailers_pod() -> Iterator[str]:
    """A pod that names itself pod-a in its headers, and in its trailers what the request says."""

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.send_initial_metadata(_POD_A.to_metadata())
        context.set_trailing_metadata(_TRAILERS[request])
        return request

    server = server_with_own_workers(2)
    handler = grpc.unary_unary_rpc_method_handler(unary)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"U": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


async def test_trailers_that_contradict_headers_seen_before_are_malformed(
    trailers_pod: str,
) -> None:
    """A unary call whose headers were seen before is counted the short way (observe(), sync
    and aio, and the sync interceptor on its first channel); its trailers are still read:
    naming another pod makes it malformed, naming none or the same pod does not."""
    options = ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
    with observe(grpc.insecure_channel(trailers_pod), options) as channel:
        call = channel.unary_unary("/t.T/U")
        for request in _SEQUENCE:
            assert call(request, timeout=5) == request
        sync = channel.detector.snapshot()
    aio_options = options.but(registry=AffinityRegistry(NO_WARMUP))
    # target= given: grpcio before 1.5x keeps no target on an aio channel
    aio_channel = grpc.aio.insecure_channel(trailers_pod)
    async with observe_aio(aio_channel, aio_options, target=trailers_pod) as channel:
        call = channel.unary_unary("/t.T/U")
        for request in _SEQUENCE:
            assert await call(request, timeout=5) == request
        aio = channel.detector.snapshot()
    # The interceptor form, on the first channel (its own lane) and on a second one.
    interceptors = affinity_interceptors(
        trailers_pod, options.but(registry=AffinityRegistry(NO_WARMUP))
    )
    for _ in range(2):
        with grpc.intercept_channel(grpc.insecure_channel(trailers_pod), *interceptors) as channel:
            call = channel.unary_unary("/t.T/U")
            for request in _SEQUENCE:
                assert call(request, timeout=5) == request
    intercepted = interceptors[0].detector.snapshot()
    assert intercepted.malformed_calls == 2 * _SEQUENCE.count(b"b")
    assert set(intercepted.pods) == {"pod-a"} and "pod-b" not in intercepted.known_pods
    for snapshot in (sync, aio):
        assert snapshot.malformed_calls == _SEQUENCE.count(b"b")
        assert snapshot.calls == len(_SEQUENCE)
        assert set(snapshot.pods) == {"pod-a"} and "pod-b" not in snapshot.known_pods
        assert snapshot.pods["pod-a"].calls == len(_SEQUENCE) - _SEQUENCE.count(b"b")


class _Forward:
    """A channel wrapper whose four methods take ``_registered_method`` (``flag``: and always
    pass it on, as stubs of grpcio-tools 1.62+ do) or predate it (not ``flag``)."""

    def __init__(self, inner: Any, flag: bool) -> None:
        self._inner = inner
        self._flag = flag

    def __getattr__(self, name: str) -> Any:
        make = getattr(self._inner, name)
        if name not in CALL_KINDS:
            return make
        if self._flag:
            return lambda method, request_serializer=None, response_deserializer=None: make(
                method, request_serializer, response_deserializer, _registered_method=True
            )
        return lambda method, request_serializer=None, response_deserializer=None: make(
            method, request_serializer, response_deserializer
        )


@pytest.mark.parametrize("flavour", ["sync", "aio"])
async def test_registering_stubs_work_over_a_channel_that_predates_the_flag(
    sync_pod: SyncPod, aio_pod: AioPod, flavour: str
) -> None:
    options = ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
    if flavour == "sync":
        inner: Any = _Forward(grpc.insecure_channel(sync_pod.target), flag=False)
        observed: Any = observe(inner, options, target=sync_pod.target)
        seen = [call_sync(_Forward(observed, flag=True), kind) for kind in CALL_KINDS]
        observed.close()
    else:
        inner = _Forward(grpc.aio.insecure_channel(aio_pod.target), flag=False)
        observed = observe_aio(inner, options, target=aio_pod.target)
        seen = [await call_aio(_Forward(observed, flag=True), kind) for kind in CALL_KINDS]
        await observed.close()
    assert [s.code for s in seen] == [grpc.StatusCode.OK] * 4
    assert observed.detector.snapshot().pods[IDENTITY.name].calls == 4
