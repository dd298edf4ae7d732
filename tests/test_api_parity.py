"""The same API in sync and ``grpc.aio`` (issue 22, item 3): the factories and classes both
flavours export take the same parameters (names, kinds, defaults, order; aio's extras listed
here), no public factory takes ``**kwargs``, the dial-per-request stats are one dataclass,
``channel_factory`` is called the same way, and a call with no lane fails with the same error.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from fault_load import wait_for

import grpc_balance_mw
import grpc_balance_mw.aio
from grpc_balance_mw import routed_channel
from grpc_balance_mw._routing import ChannelFactory, lane_factory
from grpc_balance_mw.dial_per_request import RedialStats
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

#: Parameters only the aio form has: the user's client interceptors (sync channels take them
#: with ``grpc.intercept_channel`` around the channel).
AIO_EXTRAS: dict[str, set[str]] = {
    "BalancedChannel": {"interceptors"},
    "balanced_channel": {"interceptors"},
    "DialPerRequestChannel": {"interceptors"},
    "dial_per_request_channel": {"interceptors"},
    # aio observes a channel made with interceptors by interceptors of its own, not by
    # done-callbacks: the one way both flavours observe is issue 22 item 1's.
    "ObservedChannel": {"intercepted"},
}
#: Parameters whose default is the flavour's own: how retries sleep (``time.sleep`` against
#: ``asyncio.sleep``).
FLAVOUR_DEFAULTS = {"sleep"}


def shared_names() -> list[str]:
    """The callables both packages export under the same name."""
    both = set(grpc_balance_mw.__all__) & set(grpc_balance_mw.aio.__all__)
    return sorted(name for name in both if callable(getattr(grpc_balance_mw, name)))


def public_callables() -> Iterator[tuple[str, Callable[..., Any]]]:
    """The exported functions and classes (exceptions and enums take what their bases do)."""
    for package in (grpc_balance_mw, grpc_balance_mw.aio):
        for name in package.__all__:
            value = getattr(package, name)
            if inspect.isclass(value) and issubclass(value, (BaseException, enum.Enum)):
                continue
            if inspect.isfunction(value) or inspect.isclass(value):
                yield f"{package.__name__}.{name}", value


def parameters(value: Callable[..., Any]) -> list[inspect.Parameter]:
    target = value.__init__ if inspect.isclass(value) else value  # type: ignore[misc]
    found = list(inspect.signature(target).parameters.values())
    return found[1:] if inspect.isclass(value) else found


def shape(found: list[inspect.Parameter]) -> list[tuple[str, Any, Any]]:
    return [
        (p.name, p.kind, "flavour's own" if p.name in FLAVOUR_DEFAULTS else p.default)
        for p in found
    ]


def test_the_shared_names_cover_the_factories() -> None:
    assert {
        "BalancedChannel",
        "DialPerRequestChannel",
        "balanced_channel",
        "channel_factory",
        "dial_per_request_channel",
        "observe",
    } <= set(shared_names())


@pytest.mark.parametrize("name", shared_names())
def test_sync_and_aio_take_the_same_parameters(name: str) -> None:
    sync = parameters(getattr(grpc_balance_mw, name))
    extras = AIO_EXTRAS.get(name, set())
    aio_all = parameters(getattr(grpc_balance_mw.aio, name))
    assert {p.name for p in aio_all} >= extras, f"aio {name} lost {extras}"
    aio = [p for p in aio_all if p.name not in extras]
    assert shape(aio) == shape(sync)


@pytest.mark.parametrize("name", [name for name, _ in public_callables()])
def test_no_public_factory_takes_kwargs(name: str) -> None:
    value = dict(public_callables())[name]
    kinds = {p.name: p.kind for p in parameters(value)}
    assert inspect.Parameter.VAR_KEYWORD not in kinds.values(), f"{name}{kinds}"


def test_dial_per_request_stats_are_one_dataclass() -> None:
    sync = grpc_balance_mw.dial_per_request_channel("127.0.0.1:1", observe=False)
    sync.close()

    async def aio_stats() -> Any:
        channel = grpc_balance_mw.aio.dial_per_request_channel("127.0.0.1:1", observe=False)
        await channel.close()
        return channel.stats

    stats = asyncio.run(aio_stats())
    assert type(sync.stats) is RedialStats
    assert type(stats) is RedialStats
    assert stats == RedialStats() == sync.stats
    with pytest.warns(DeprecationWarning, match="stats.name"):
        assert stats["dialled"] == 0  # the old aio dict access, deprecated for one release


@pytest.mark.parametrize("package", [grpc_balance_mw, grpc_balance_mw.aio])
def test_channel_factory_is_called_one_way(package: Any) -> None:
    """Both flavours' factories are ``factory(extra_options, interceptors)``."""
    made = package.channel_factory("127.0.0.1:1")
    signature = inspect.signature(made)
    signature.bind((), ())
    assert [p.kind for p in signature.parameters.values()] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD
    ] * 2
    assert lane_factory(made, "sync" if package is grpc_balance_mw else "grpc.aio") is made
    other = "grpc.aio" if package is grpc_balance_mw else "sync"
    with pytest.raises(ConfigurationError, match="channel_factory"):
        lane_factory(made, other)


def test_a_one_argument_sync_factory_still_works_deprecated() -> None:
    calls: list[Any] = []

    def old(extra: Any) -> str:
        calls.append(extra)
        return "channel"

    with pytest.warns(DeprecationWarning, match="factory"):
        adapted: ChannelFactory[str] = lane_factory(old, "sync")
    assert adapted((("k", 1),), ()) == "channel"
    assert calls == [(("k", 1),)]
    with pytest.raises(ConfigurationError, match="interceptors"):
        adapted((), ("an interceptor",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lane_factory(lambda extra, interceptors: "channel", "sync")  # the form: no warning


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def no_connection(channel: Any) -> bool:
    return all(lane.connection is None for lane in channel.pool.lanes)


REQUEST = pb.GetChargePointRequest(id="cp-1")


def test_a_call_with_no_lane_fails_the_same_in_both_flavours() -> None:
    """Nothing listens: once the first checks failed, a call fails at once with
    ``NoLaneError`` (UNAVAILABLE) in both flavours; aio's is also a ``grpc.aio.AioRpcError``."""
    target = f"127.0.0.1:{free_port()}"
    with grpc_balance_mw.balanced_channel(target, lanes=1, observe=False) as channel:
        assert wait_for(lambda: no_connection(channel))
        with pytest.raises(routed_channel.NoLaneError) as sync_error:
            pb_grpc.ChargePointsStub(channel).GetChargePoint(REQUEST, timeout=5)

    async def aio_call() -> BaseException:
        channel = grpc_balance_mw.aio.balanced_channel(target, lanes=1, observe=False)
        try:
            deadline = time.monotonic() + 10
            while not no_connection(channel) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert no_connection(channel)
            with pytest.raises(grpc.RpcError) as raised:
                await pb_grpc.ChargePointsStub(channel).GetChargePoint(REQUEST, timeout=5)
            return raised.value
        finally:
            await channel.close()

    aio_error = asyncio.run(aio_call())
    assert isinstance(aio_error, routed_channel.NoLaneError)
    assert isinstance(aio_error, grpc.aio.AioRpcError)
    assert isinstance(aio_error, grpc_balance_mw.aio.balanced.NoLaneError)
    for error in (sync_error.value, aio_error):
        assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert sync_error.value.details() == aio_error.details()
