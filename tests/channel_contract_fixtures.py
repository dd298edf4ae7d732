"""What the channel contract tests share: every wrapper made the same way, sync and aio, and
the cases a wrapper does not keep yet (strict xfails) or cannot keep (documented differences,
asserted as such; docs/channel_contract.md lists them)."""

from __future__ import annotations

import socket
from typing import Any

import grpc
import pytest
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import (
    affinity_interceptors,
    balanced_channel,
    channel_factory,
    dial_per_request_channel,
    observe,
)
from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.server import add_health
from grpc_balance_mw.testing.charge_points.servicer import (
    SERVICE_NAME,
    ChargePointsServicer,
    SyncChargePointsServicer,
)
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

#: Every way this package hands out a channel; aio also observes a channel made with interceptors
#: (``observe`` then appends its own interceptors instead of wrapping the calls).
SYNC_WRAPPERS = ("bare", "observe", "interceptors", "balanced", "dial_per_request", "rebalanced")
AIO_WRAPPERS = (*SYNC_WRAPPERS, "observe_intercepted")
#: Wrappers whose calls are grpc.aio's intercepted calls, which have no ``time_remaining()``.
INTERCEPTED = frozenset({"interceptors", "observe_intercepted"})
#: Made of several connections, each health-checked: the server sees RPCs the caller did not make.
MULTI_CONNECTION = frozenset({"balanced", "rebalanced"})

#: Bounds for every wait in the contract tests (the server answers on loopback in ms).
WAIT_S = 3.0
#: The bound of a wait a wrapper that does not keep the contract runs into (a strict xfail):
#: a stream's deadline after close(), a channel that never reports READY.
SHORT_S = 1.0
#: How long after the call a late server starts (wait_for_ready).
LATE_START_S = 1.0
#: How long a channel has been failing to connect when the waiting calls are made.
HAS_FAILED_S = 0.3
#: wait_for_ready calls made one after another, so that they meet the channel in each of the
#: states a channel with no server goes through.
WAITERS, WAITER_SPACING_S = 5, 0.05
#: Channels made at most to find one in the state ``has_no_lane`` looks for.
TRIES = 3


def has_no_lane(channel: Any) -> bool:
    """Whether a balanced (or rebalanced) channel has no live lane now: the state in which its
    wait_for_ready calls fail (issue 20 item 4). True for channels without lanes.

    Its pool's lanes come and go while the server is down (dialled, checked, dropped), and a
    call made while one is being checked or drained waits as it should: the test looks for
    this state so the case does not pass or fail by timing. A pool laid out otherwise counts
    as having none.
    """
    balanced = getattr(getattr(channel, "rebalancer", None), "balanced", None) or channel
    lanes = getattr(getattr(balanced, "pool", None), "lanes", None)
    return lanes is None or all(lane.is_closed() for lane in list(lanes))


_ROUTING = "issue 20 {}: routing core"
#: Behaviours a wrapper does not keep yet, as (form, wrapper, behaviour) -> the issue item: each
#: is a strict xfail, so it fails the day the behaviour is fixed. None today.
GAPS: dict[tuple[str, str, str], str] = {}

GRPCIO = tuple(int(part) for part in grpc.__version__.split(".")[:2])
#: What grpc.aio itself does otherwise on older grpcio, measured on 1.50 (the floor then)
#: and 1.62.3, not on the versions between 1.62 and 1.85: ``close()`` leaves a stream in flight
#: to its deadline, bare channels included; and a stream call through aio client interceptors
#: (ours, or any) can end its reads early or miss its deadline. The contract then holds as
#: grpc.aio of that version holds it; the tests of these behaviours run on grpcio 1.85 and later
#: (docs/channel_contract.md).
OLD_GRPC_AIO = GRPCIO < (1, 85)
_OLD_AIO_REASON = "grpcio {} grpc.aio: {} (see OLD_GRPC_AIO)"
_INTERCEPTED = frozenset({"interceptors", "observe_intercepted"})
_OLD_AIO: dict[str, tuple[frozenset[str] | None, str]] = {
    "close": (None, "close() leaves a stream in flight to its deadline, bare included"),
    "call_objects": (_INTERCEPTED, "intercepted stream calls end their reads early"),
    "positional_timeout": (_INTERCEPTED, "intercepted stream calls miss their deadline"),
    "deadline": (_INTERCEPTED, "intercepted stream calls miss their deadline"),
    "user_interceptor": (_INTERCEPTED, "intercepted stream calls miss their deadline"),
}


def _old_aio_mark(form: str, wrapper: str, behaviour: str) -> list[Any]:
    rule = _OLD_AIO.get(behaviour) if form == "aio" else None
    if rule is None or (rule[0] is not None and wrapper not in rule[0]):
        return []
    reason = _OLD_AIO_REASON.format(grpc.__version__, rule[1])
    return [pytest.mark.skipif(OLD_GRPC_AIO, reason=reason)]


def cases(form: str, behaviour: str) -> list[Any]:
    """The wrappers of ``form`` ("sync" or "aio") as parameters, the known gaps marked."""
    wrappers = SYNC_WRAPPERS if form == "sync" else AIO_WRAPPERS
    params = []
    for wrapper in wrappers:
        item = GAPS.get((form, wrapper, behaviour))
        marks = (
            [pytest.mark.xfail(strict=True, reason=_ROUTING.format(item))]
            if item is not None
            else []
        )
        marks += _old_aio_mark(form, wrapper, behaviour)
        params.append(pytest.param(wrapper, marks=marks, id=wrapper))
    return params


def options() -> ObserveOptions:
    # A registry of its own: no evidence shared with other tests' channels to the same address.
    # No probe: its rounds are connections of their own, not the wrapped channel's behaviour
    # (docs/channel_contract.md lists the Health RPCs they make; test_default_probe.py tests it).
    return ObserveOptions(registry=AffinityRegistry(), probe=False)


#: Channel options for a server that starts late: reconnect soon after it is up.
SOON = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 200))
Options = tuple[tuple[str, Any], ...]


def sync_channel(
    wrapper: str,
    target: str,
    compression: grpc.Compression | None = None,
    channel_options: Options = (),
) -> grpc.Channel:
    """A sync channel to ``target`` made the way ``wrapper`` names."""

    def plain() -> grpc.Channel:
        return grpc.insecure_channel(target, options=channel_options, compression=compression)

    if wrapper == "bare":
        return plain()
    if wrapper == "observe":
        return observe(plain(), options())
    if wrapper == "interceptors":
        return grpc.intercept_channel(plain(), *affinity_interceptors(target, options()))
    if wrapper == "balanced":
        # Passed only when asked for: balanced_channel takes no compression= yet (item 7).
        asked = {} if compression is None else {"compression": compression}
        return balanced_channel(target, options=channel_options, observe=options(), **asked)
    if wrapper == "dial_per_request":
        return dial_per_request_channel(
            target, options=channel_options, compression=compression, observe=options()
        )
    if wrapper == "rebalanced":
        rebalance = Rebalance(channel_factory(target, options=channel_options), when="always")
        return observe(plain(), options(), rebalance=rebalance)
    raise AssertionError(wrapper)


class _NoOp(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """A user's interceptor that changes nothing."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


def aio_channel(
    wrapper: str,
    target: str,
    compression: grpc.Compression | None = None,
    channel_options: Options = (),
) -> grpc.aio.Channel:
    """An aio channel to ``target`` made the way ``wrapper`` names (inside a running loop)."""

    def plain(interceptors: Any = None) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            target, options=channel_options, compression=compression, interceptors=interceptors
        )

    if wrapper == "bare":
        return plain()
    if wrapper == "observe":
        # target= because grpcio before 1.5x keeps no target on an aio channel.
        return balance_aio.observe(plain(), options(), target=target)
    if wrapper == "observe_intercepted":
        return balance_aio.observe(plain([_NoOp()]), options(), target=target)
    if wrapper == "interceptors":
        return plain(balance_aio.affinity_interceptors(target, options()))
    if wrapper == "balanced":
        asked = {} if compression is None else {"compression": compression}
        return balance_aio.balanced_channel(
            target, options=channel_options, observe=options(), **asked
        )
    if wrapper == "dial_per_request":
        return balance_aio.dial_per_request_channel(
            target, options=channel_options, compression=compression, observe=options()
        )
    if wrapper == "rebalanced":
        factory = balance_aio.channel_factory(target, options=channel_options)
        rebalance = Rebalance(factory, when="always")
        return balance_aio.observe(plain(), options(), rebalance=rebalance, target=target)
    raise AssertionError(wrapper)


def free_port() -> int:
    """A loopback port nothing listens on now (for a server that starts after the call)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MethodLog(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every RPC a server is asked for, by method, in order."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        self.methods.append(handler_call_details.method)
        return continuation(handler_call_details)


def sync_server(port: int = 0, log: MethodLog | None = None) -> tuple[grpc.Server, str]:
    """A sync charge-points server with health on loopback, started."""
    server = server_with_own_workers(4, interceptors=[log] if log is not None else [])
    pb_grpc.add_ChargePointsServicer_to_server(SyncChargePointsServicer("late"), server)
    add_health(server, services=(SERVICE_NAME,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{bound}"


async def aio_server(port: int = 0) -> tuple[grpc.aio.Server, str]:
    """A plain aio charge-points server on loopback, started."""
    server = grpc.aio.server()
    pb_grpc.add_ChargePointsServicer_to_server(ChargePointsServicer("late"), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{bound}"


# Requests: a quick one of each kind, and a stream that runs for seconds unless stopped.
POINT = pb.GetChargePointRequest(id="cp-1")
SLOW_UPDATES = pb.WatchStatusRequest(id="cp-1", updates=100, interval_ms=50)
METER = (pb.MeterValue(energy_wh=1.0), pb.MeterValue(energy_wh=2.0))
SESSION = (pb.SessionMessage(command="start"), pb.SessionMessage(command="stop"))
#: A metadata value that is not a str: grpc refuses it before the call starts.
BAD_METADATA = ((42, 42),)
CANCELLED = grpc.StatusCode.CANCELLED.value[0]
