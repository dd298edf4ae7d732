"""The balanced channel for ``grpc.aio``: lanes, each its own TCP connection, one per pod.

Usage (inside a running event loop)::

    channel = balanced_channel("charge-points.ev.svc.cluster.local:50051")
    stub = ChargePointsStub(channel)          # wherever a grpc.aio.Channel goes
    ...
    await channel.close()

The same :class:`~grpc_balance_mw.pool.LanePool` as the sync
:class:`~grpc_balance_mw.balanced.BalancedChannel` decides; here its plans are carried out by one
asyncio task (dials, health checks that name each lane's pod, closes), and each call gives its
lane back from the call's done-callback, which also reports each call's pod to the lane's
observer (spans carry pod and lane; the detector's alarm is a rotation trigger), as aio
``observe()`` does: no interceptor, no task per call. The per-call routine is the aio routing
core's (:mod:`grpc_balance_mw.aio.routed_channel`); this module is its router.

``retry=RetryPolicy(...)`` as in the sync channel: a retried unary-response call runs its
attempts in a task (``code()`` and the metadata are the last attempt's); a retried response stream
retries in its first ``read()``. A channel belongs to one event loop (see ``docs/concurrency.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc

from grpc_balance_mw._routing import (
    ChannelFactory,
    LaneRoutes,
    check_channel_options,
    lane_factory,
    made_for,
)
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.aio.interceptors import (
    AffinityInterceptors,
    append_interceptors,
    has_interceptors,
)
from grpc_balance_mw.aio.routed_channel import (
    Connectivity,
    NoLaneError,
    RoutedChannel,
    check_interceptors,
    spawn_soon,
)
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.observing import (
    ObserveOptions,
    build_observer,
    chosen_options,
    detector_for,
)
from grpc_balance_mw.pool import (
    CheckResult,
    Lane,
    LanePool,
    Picker,
    Plan,
    PoolConfig,
    Rotation,
    Signals,
    Stuck,
)
from grpc_balance_mw.pool.health import (
    CHECK_GRACE_S,
    CheckFaults,
    read_check,
    read_reply,
)
from grpc_balance_mw.pool.outliers import OUTLIERS
from grpc_balance_mw.pool.pool import pool_for_channel
from grpc_balance_mw.retry import (
    NO_RETRY,
    RetryPolicy,
    warn_if_native_retry,
)

__all__ = [
    "AioChannelFactory",
    "BalancedChannel",
    "NoLaneError",
    "balanced_channel",
    "channel_factory",
]

_log = logging.getLogger(__name__)

Options = Sequence[tuple[str, Any]]
Interceptors = Sequence[grpc.aio.ClientInterceptor]
#: Makes one lane's channel: ``factory(extra_options, interceptors)``, the same form as the
#: sync one's (:class:`grpc_balance_mw._routing.ChannelFactory`).
AioChannelFactory = ChannelFactory[grpc.aio.Channel]
#: gRPC core shares one connection between channels with the same target and arguments.
LOCAL_POOL_OPTION = ("grpc.use_local_subchannel_pool", 1)
_BURST_ROUNDS = 16


def channel_factory(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options | None = None,
    compression: grpc.Compression | None = None,
) -> AioChannelFactory:
    """The factory ``grpc.aio.secure_channel`` / ``insecure_channel`` make; TLS on every lane.

    Raises:
        ConfigurationError: ``options`` are not grpc channel options (``ObserveOptions`` go
            to ``observe()``, not here).
    """
    base = check_channel_options(options, "channel_factory")

    def make(extra: Options, interceptors: Interceptors = ()) -> grpc.aio.Channel:
        # By keyword: opentelemetry-instrumentation-grpc's aio instrumentor wraps these
        # functions and sets ``interceptors=`` itself, so a positional one is given twice.
        merged = (*base, *extra)
        kwargs = {"options": merged, "compression": compression, "interceptors": interceptors}
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, **kwargs)
        return grpc.aio.insecure_channel(target, **kwargs)

    return made_for(make, "grpc.aio")


#: The health check's method name as grpc.aio hands it to interceptors (bytes), and as str.
_HEALTH_CHECK = (b"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Check")


class _PastHealthChecks(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the lanes' own health checks past a user's interceptor: they are the channel's
    housekeeping (every few seconds per lane, and every scout), not the user's calls."""

    def __init__(self, interceptor: grpc.aio.UnaryUnaryClientInterceptor) -> None:
        self._interceptor = interceptor

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        if client_call_details.method in _HEALTH_CHECK:
            return await continuation(client_call_details, request)
        return await self._interceptor.intercept_unary_unary(
            continuation, client_call_details, request
        )


def _past_health_checks(observer: CallObserver) -> list[Any]:
    """Observing interceptors for ``observer``'s lane that let the lane's health checks by."""
    return [
        _PastHealthChecks(interceptor)
        if isinstance(interceptor, grpc.aio.UnaryUnaryClientInterceptor)
        else interceptor
        for interceptor in AffinityInterceptors(observer.target, observer=observer).interceptors
    ]


class _LaneConnection:
    __slots__ = ("callables", "channel", "check", "observer")

    def __init__(self, channel: grpc.aio.Channel, observer: CallObserver | None) -> None:
        self.channel = channel
        self.observer = observer
        self.check = check_method(channel, lenient=True)
        self.callables: dict[Any, Any] = {}


async def _maintenance(channel: Any, first: Plan | None) -> None:
    """The maintenance task's body, on a weak proxy of the channel (see ``start``)."""
    with contextlib.suppress(ReferenceError):
        await BalancedChannel._maintain(channel, first)


_closing: set[asyncio.Task[Any]] = set()


def _finalize(
    loop: asyncio.AbstractEventLoop,
    task: asyncio.Task[None],
    pool: LanePool,
    connectivity: Connectivity,
    detector: AffinityDetector,
) -> None:
    """Release what an unclosed, garbage-collected channel held: its maintenance task (and so
    the health checks), the lanes' connections, the connectivity connection."""
    detector.lanes_opened(False)

    def closing(work: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(work)
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    def release() -> None:
        task.cancel()
        for lane in pool.close():
            connection: _LaneConnection | None = lane.connection
            if connection is not None:
                connection.callables.clear()
                closing(connection.channel.close())
        closing(connectivity.close())

    spawn_soon(loop, release)


class BalancedChannel(LaneRoutes, RoutedChannel[Lane]):
    """A ``grpc.aio.Channel`` that spreads calls over lanes to distinct pods.

    Made by :func:`balanced_channel`; this constructor takes a channel factory. The
    arguments are those of :class:`grpc_balance_mw.balanced.BalancedChannel`, plus
    ``interceptors`` (the user's, for every lane). Its maintenance task starts with the first
    call, or here if an event loop is running. The channel is its own router
    (:class:`~grpc_balance_mw.aio.routed_channel.AioRouter`): its routes are the lanes, whose
    calls are observed from their done-callbacks, as aio ``observe()`` observes a channel.
    """

    def __init__(
        self,
        factory: AioChannelFactory,
        target: str,
        *,
        pool: LanePool | None = None,
        observe: ObserveOptions | bool = True,
        check_timeout_s: float = 1.0,
        tick_s: float = 0.25,
        retry: RetryPolicy = NO_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        interceptors: Interceptors | None = None,
    ) -> None:
        if check_timeout_s <= 0 or tick_s <= 0:
            raise ConfigurationError("check_timeout_s and tick_s must be > 0")
        self._user_interceptors = [
            _PastHealthChecks(interceptor)
            if isinstance(interceptor, grpc.aio.UnaryUnaryClientInterceptor)
            else interceptor
            for interceptor in check_interceptors(interceptors)
        ]
        self.target = target
        self.retry = retry
        self.sleep = sleep
        chosen = chosen_options(observe)
        self._observe = chosen is not None
        self._options = chosen if chosen is not None else ObserveOptions()
        self.pool = (
            pool
            if pool is not None
            else LanePool(PoolConfig(expected_pods=self._options.expected_pods))
        )
        self._factory = factory = lane_factory(factory, "grpc.aio")
        self._connectivity = Connectivity(lambda: factory((LOCAL_POOL_OPTION,), ()))
        self.detector: AffinityDetector = detector_for(target, self._options)
        # One model of the target's pods: the detector judges from what the lanes found.
        self.pool.share_membership(self.detector.membership)
        # The target's calls (these at least) run on lanes: an alarm's advice is not to use them.
        self.detector.lanes_opened()
        self._check_timeout_s = check_timeout_s
        self._tick_s = tick_s
        self._task: asyncio.Task[None] | None = None
        # Set by the first call after an idle round (the pool's on_wake): the task plans at once.
        self._wake = asyncio.Event()
        self.pool.on_wake = self._wake.set
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        self._faults = CheckFaults(_log, target)
        self._first: Plan | None = self.pool.plan(signals=self._signals())
        # grpc.aio channels belong to the loop they are made in: without a running loop here,
        # the lanes are opened (and the task started) by the first call.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop()
            self.start()

    def __repr__(self) -> str:
        return f"<BalancedChannel {self.target} {self.pool!r}>"

    @property
    def stuck(self) -> Stuck | None:
        """Why rotation cannot spread the calls (session affinity, an L7 proxy), if so."""
        return self.pool.stuck

    def start(self) -> None:
        """Start the maintenance task on the running loop (once)."""
        if self._task is None and not self._closed:
            first, self._first = self._first, None
            loop = asyncio.get_running_loop()
            for lane in first.dial if first is not None else ():
                self._open(lane)  # lazily, as grpc.aio channels connect: calls can start now
            # The task holds the channel weakly: an unclosed channel is freed with its last
            # reference, and its finalizer stops the task and closes the lanes.
            self._task = loop.create_task(
                _maintenance(weakref.proxy(self), first), name=f"balanced-channel {self.target}"
            )
            self._finalizer = weakref.finalize(
                self, _finalize, loop, self._task, self.pool, self._connectivity, self.detector
            )

    # -- lanes -----------------------------------------------------------------------------

    def _open(self, lane: Lane) -> None:
        channel = self._factory((LOCAL_POOL_OPTION,), self._user_interceptors)
        observer = self._observer(lane)
        # A lane made with interceptors (a user's, or opentelemetry-instrumentation-grpc's aio
        # instrumentor's) is observed by interceptors appended after them, as aio observe()
        # does: their span is then current when the pod is read, and is enriched instead of a
        # second span made. Otherwise a done-callback observes each call, at less cost.
        if (
            observer is not None
            and has_interceptors(channel)
            and append_interceptors(channel, _past_health_checks(observer))
        ):
            observer = None
        lane.connection = _LaneConnection(channel, observer)

    def _observer(self, lane: Lane) -> CallObserver | None:
        """The one place a lane's calls are observed (from their done-callbacks; the lane's
        health checks go around it, as the channel's housekeeping)."""
        if not self._observe:
            return None
        return build_observer(self.target, self._options.but(lane=lane.name, probe=False))

    def _signals(self) -> Signals:
        if not self._observe:
            return Signals()
        snapshot = self.detector.snapshot()
        return Signals(snapshot.state.value, snapshot.top_pod, snapshot.known_count)

    async def _maintain(self, first: Plan | None) -> None:
        plan = first
        burst = 0
        while True:
            pause = self._tick_s
            try:
                if plan is None:
                    plan = self.pool.plan(signals=self._signals)
                busy, pause = bool(plan.dial), plan.pause(self._tick_s)
                await self._carry_out(plan)
            except asyncio.CancelledError:
                raise
            except Exception:  # a background task: nothing above it would see the error
                _log.exception("balanced channel %s: maintenance round failed", self.target)
                busy = False
            plan = None
            burst = burst + 1 if busy and burst < _BURST_ROUNDS else 0
            if burst:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(asyncio.TimeoutError):  # a tick, or longer while idle:
                await asyncio.wait_for(self._wake.wait(), pause)  # the first call wakes it
            self._wake.clear()

    async def _carry_out(self, plan: Plan) -> None:
        await self._close_lanes(plan.close)
        for message in plan.warnings():
            _log.warning("balanced channel %s: %s", self.target, message)
        for lane in plan.drain:
            _log.debug("balanced channel %s: %r drains", self.target, lane)
        for event in plan.outliers:  # the log, and an event on the next call's span
            _log.log(event.level, "balanced channel %s: %s", self.target, event.message)
            self.detector.note_pod_event(event.kind, event.endpoint, OUTLIERS, event.at)
        lanes = [*plan.dial, *plan.check]
        while lanes:
            await self._check_lanes(lanes)
            lanes = self.pool.confirmations()  # new pods' names, checked once more

    async def _check_lanes(self, planned: Sequence[Lane]) -> None:
        # Every lane handed out is reported to the pool whatever fails (see the sync channel).
        lanes = []
        for lane in planned:
            try:
                if lane.connection is None:
                    self._open(lane)
            except Exception as error:  # background maintenance: logged, the lane reported
                self.pool.checked(lane, self._faults.failed(lane, error))
                continue
            lanes.append(lane)
        results = await asyncio.gather(
            *(self._check(lane) for lane in lanes), return_exceptions=True
        )
        for lane, result in zip(lanes, results, strict=True):
            if isinstance(result, BaseException):
                result = self._faults.failed(lane, result)
            self.pool.checked(lane, self._faults.seen(lane, result))

    async def _check(self, lane: Lane) -> CheckResult:
        connection: _LaneConnection = lane.connection
        call = connection.check("", timeout=self._check_timeout_s)
        try:
            # Bounded past the check's own deadline as in sync (see check_result).
            response = await asyncio.wait_for(call, self._check_timeout_s + CHECK_GRACE_S)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            call.cancel()
            return read_check("DEADLINE_EXCEEDED", False)
        except grpc.aio.AioRpcError as error:
            headers = self._options.pod_headers
            return read_check(error.code().name, False, None, error.trailing_metadata(), headers)
        initial, trailing = await call.initial_metadata(), await call.trailing_metadata()
        return read_reply(response, initial, trailing, self._options.pod_headers)

    async def _close_lanes(self, lanes: Sequence[Lane], grace: float | None = None) -> None:
        channels = []
        for lane in lanes:
            connection: _LaneConnection | None = lane.connection
            if connection is not None:
                connection.callables.clear()
                channels.append(connection.channel.close(grace))
        await asyncio.gather(*channels)

    # -- the router -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def observer(self, lane: Lane) -> CallObserver | None:
        connection: _LaneConnection = lane.connection
        return connection.observer

    # -- grpc.aio.Channel ------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Stop the maintenance task and close every lane (``grace`` as grpc.aio's close)."""
        if not self._closed:  # once per channel (one loop: no race)
            self.detector.lanes_opened(False)
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_lanes(self.pool.close(), grace)
        await self._connectivity.close()

    async def __aenter__(self) -> BalancedChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


def balanced_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options | None = None,
    *,
    lanes: int = 3,
    max_lanes: int = 8,
    follow_pods: bool = True,
    picker: Picker | None = None,
    rotation: Rotation | None = None,
    pool_config: PoolConfig | None = None,
    observe: ObserveOptions | bool = True,
    factory: AioChannelFactory | None = None,
    retry: RetryPolicy = NO_RETRY,
    compression: grpc.Compression | None = None,
    interceptors: Interceptors | None = None,
) -> BalancedChannel:
    """A balanced ``grpc.aio`` channel to ``target``, made as ``grpc.aio.secure_channel`` (with
    ``credentials``) or ``grpc.aio.insecure_channel`` would make one; the arguments are those
    of :func:`grpc_balance_mw.balanced.balanced_channel` (``factory`` also takes the lane's
    interceptors), plus ``interceptors``: the user's client interceptors, on every lane, as
    ``grpc.aio.insecure_channel(interceptors=...)`` takes them."""
    if factory is not None and (credentials is not None or options or compression):
        raise ConfigurationError("pass either a factory or credentials/options, not both")
    if retry.max_attempts > 1:
        warn_if_native_retry(options, target)
    pool = pool_for_channel(
        lanes=lanes,
        max_lanes=max_lanes,
        follow_pods=follow_pods,
        expected_pods=(chosen_options(observe) or ObserveOptions()).expected_pods,
        pool_config=pool_config,
        picker=picker,
        rotation=rotation,
    )
    return BalancedChannel(
        factory
        if factory is not None
        else channel_factory(target, credentials, options, compression),
        target,
        pool=pool,
        observe=observe,
        retry=retry,
        interceptors=interceptors,
    )
