"""An aio call the package observes or routes is freed with its last reference, and a closed
channel's connections close with it.

Before grpcio 1.84, grpc.aio's ``Call.add_done_callback`` gives the core call
``partial(callback, call)``, and the core call keeps it after it has run: every call with a
done-callback is a reference cycle that only the cyclic garbage collector frees. The core call
in that cycle holds its connection open after the channel's ``close()`` until the collector
runs (measured on 1.62.3 and 1.80: up to 14 connections of closed balanced channels open at a
time). There the package's done-callbacks go on the core call instead and drop the call once
run (``grpc_balance_mw.aio._grpcio.when_done``); these tests take that way on every grpcio.
Each runs with the collector off, so a cycle stays a cycle: without the holder, 6 of them
failed on grpcio 1.50 and 1.62.3. CI's floors stage runs them on grpcio's floor.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from channel_contract_fixtures import OLD_GRPC_AIO
from conftest import AioPod
from fault_load import until
from leak_fixtures import _tcp_sockets

from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry
from grpc_balance_mw.aio import _grpcio as aio_grpcio
from grpc_balance_mw.aio import balanced_channel
from grpc_balance_mw.aio.observed_channel import observe as observe_aio
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.telemetry import AffinityTelemetry
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

REQUEST = pb.GetChargePointRequest(id="cp-1")
STATUS = pb.WatchStatusRequest(id="cp-1", updates=2, interval_ms=1)
CALLS = 20


@pytest.fixture
def no_collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The cyclic garbage collector off for the test (what it would free is what is checked),
    and the package's done-callbacks on the core call whatever the grpcio."""
    monkeypatch.setattr(aio_grpcio, "DONE_CALLBACKS_KEPT", True)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def options(telemetry: bool) -> ObserveOptions:
    return ObserveOptions(
        registry=AffinityRegistry(AffinityConfig(warmup_s=0)),
        telemetry=AffinityTelemetry(spans=False, metrics=False) if telemetry else None,
        probe=False,
    )


def observed(target: str) -> Any:
    return observe_aio(grpc.aio.insecure_channel(target), options(False), target=target)


def observed_with_telemetry(target: str) -> Any:
    return observe_aio(grpc.aio.insecure_channel(target), options(True), target=target)


def balanced(target: str) -> Any:
    return balanced_channel(target, lanes=2, observe=options(False))


class _Passing(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """A user's interceptor that only passes calls on."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


def observed_intercepted(target: str) -> Any:
    raw = grpc.aio.insecure_channel(target, interceptors=[_Passing()])
    return observe_aio(raw, options(False), target=target)


def balanced_intercepted(target: str) -> Any:
    return balanced_channel(target, lanes=2, observe=options(False), interceptors=[_Passing()])


CHANNELS: dict[str, Callable[[str], Any]] = {
    "observe": observed,
    "observe+telemetry": observed_with_telemetry,
    "observe+interceptor": observed_intercepted,
    "balanced": balanced,
    "balanced+interceptor": balanced_intercepted,
}


async def _calls(channel: Any, kind: str) -> list[weakref.ref[Any]]:
    """``CALLS`` calls of ``kind`` to their end; weak references to them."""
    stub = pb_grpc.ChargePointsStub(channel)
    ended = []
    for _ in range(CALLS):
        if kind == "unary":
            call = stub.GetChargePoint(REQUEST, timeout=10)
            await call
        else:
            call = stub.WatchStatus(STATUS, timeout=10)
            # An intercepted stream on grpcio < 1.85 may end its reads with StopAsyncIteration
            # instead of EOF (docs/channel_contract.md).
            with contextlib.suppress(StopAsyncIteration):
                while await call.read() is not grpc.aio.EOF:
                    pass
        await call.code()
        ended.append(weakref.ref(call))
        del call
    return ended


def _alive(ended: list[weakref.ref[Any]]) -> list[str]:
    return [type(call).__name__ for call in (ref() for ref in ended) if call is not None]


def _cases() -> list[Any]:
    cases = []
    for made in CHANNELS:
        for kind in ("unary", "stream"):
            # grpc.aio < 1.85 may end a stream through two interceptors with
            # StopAsyncIteration (docs/channel_contract.md, OLD_GRPC_AIO); on 1.53 such calls
            # stayed in a cycle of grpc.aio's own (its recursive _run_interceptor closure).
            old = made.endswith("+interceptor") and kind == "stream"
            reason = "grpc.aio < 1.85: an intercepted stream's end keeps the call"
            marks = [pytest.mark.skipif(OLD_GRPC_AIO, reason=reason)] if old else []
            cases.append(pytest.param(made, kind, marks=marks, id=f"{made}-{kind}"))
    return cases


@pytest.mark.parametrize(("made", "kind"), _cases())
async def test_an_ended_call_is_freed_with_its_last_reference(
    aio_pod: AioPod, no_collector: None, made: str, kind: str
) -> None:
    """Through the package's channels, as many ended calls stay alive as through grpc.aio's own
    channel: none, but for an intercepted call, which grpc.aio itself keeps in a cycle up to
    1.80 at least, with or without a done-callback (measured on 1.53 and 1.62.3)."""
    intercepted = made.endswith("+interceptor")
    bare = grpc.aio.insecure_channel(
        aio_pod.target, interceptors=[_Passing()] if intercepted else None
    )
    channel = CHANNELS[made](aio_pod.target)
    try:
        for each in (bare, channel):
            # A first call first: OpenTelemetry's context loads on first use (1.15: through
            # pkg_resources, which keeps a traceback, and so the first caller's frames).
            await pb_grpc.ChargePointsStub(each).GetChargePoint(REQUEST, timeout=10)
        bare_ended = await _calls(bare, kind)
        ended = await _calls(channel, kind)
        # grpc.aio's own tasks for a call end on the loop just after it: a few turns of it.
        await until(lambda: not _alive(ended), timeout_s=5.0)
        assert len(_alive(ended)) <= len(_alive(bare_ended)), (_alive(ended), _alive(bare_ended))
        if not intercepted:
            assert _alive(bare_ended) == []  # a bare channel's calls free themselves
        if made.startswith("observe"):  # and every call was observed to its end
            counted = channel.detector.snapshot
            assert await until(lambda: counted().calls == CALLS + 1), counted()
    finally:
        await channel.close()
        await bare.close()


def _connections_to(port: int) -> int:
    """This network namespace's ESTABLISHED TCP connections whose far end is ``port`` (the
    client's ends of connections to a pod served in this process)."""
    return sum(s.endswith(f":{port} ESTABLISHED") for s in _tcp_sockets().values())


async def test_a_closed_balanced_channel_leaves_no_connection_open(
    aio_pod: AioPod, no_collector: None
) -> None:
    """Closed right after its calls, and closed while its lanes still connect (their first
    health checks in flight): every connection it opened closes."""
    before = _connections_to(aio_pod.port)
    for round_ in range(10):
        channel = balanced(aio_pod.target)
        try:
            if round_ % 2:
                await _calls(channel, "unary")
            else:
                channel.start()  # dials its lanes; closed before they are up
        finally:
            await channel.close()
    assert await until(lambda: _connections_to(aio_pod.port) <= before), (
        before,
        _connections_to(aio_pod.port),
    )
