"""The balanced channel for ``grpc.aio``: lanes, each its own TCP connection, one per pod.

Usage (inside a running event loop)::

    channel = balanced_channel("charge-points.ev.svc.cluster.local:50051")
    stub = ChargePointsStub(channel)          # wherever a grpc.aio.Channel goes
    ...
    await channel.close()

The same :class:`~grpc_balance_mw.pool.LanePool` as the sync
:class:`~grpc_balance_mw.channel.BalancedChannel` decides; here its plans are carried out by one
asyncio task (dials, health checks that name each lane's pod, closes), and each call gives its
lane back from the call's done-callback. Each lane's calls are observed by the aio affinity
interceptors (spans carry pod and lane; the detector's alarm is a rotation trigger).

``retry=RetryPolicy(...)`` as in the sync channel: a retried unary-response call runs its
attempts in a task (``code()`` and the metadata are the last attempt's); a retried response stream
retries in its first ``read()``. A channel belongs to one event loop (see ``docs/concurrency.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from functools import partial
from typing import Any

import grpc

from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.aio.client import affinity_interceptors
from grpc_balance_mw.aio.redial import RetryingCall, failed_as_error
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.observing import ObserveOptions, chosen_options, detector_for
from grpc_balance_mw.pool import (
    CheckResult,
    Lane,
    LanePool,
    NoLane,
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
    names_a_pod,
    read_check,
    read_reply,
)
from grpc_balance_mw.pool.pool import pool_for_channel
from grpc_balance_mw.retry import (
    NO_RETRY,
    Deadline,
    RetryPolicy,
    acall_with_retries,
    warn_if_native_retry,
)

__all__ = ["AioChannelFactory", "BalancedChannel", "balanced_channel", "channel_factory"]

_log = logging.getLogger(__name__)

Options = Sequence[tuple[str, Any]]
Interceptors = Sequence[grpc.aio.ClientInterceptor]
#: Makes one lane's channel from options (the lane's own included) and interceptors.
AioChannelFactory = Callable[[Options, Interceptors], grpc.aio.Channel]
#: gRPC core shares one connection between channels with the same target and arguments.
LOCAL_POOL_OPTION = ("grpc.use_local_subchannel_pool", 1)
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
_BURST_ROUNDS = 16
#: The health check's method name as grpc.aio hands it to interceptors (bytes), and as str.
_HEALTH_CHECK = (b"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Check")


def channel_factory(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options | None = None,
) -> AioChannelFactory:
    """The factory ``grpc.aio.secure_channel`` / ``insecure_channel`` make; TLS on every lane."""
    base = tuple(options or ())

    def make(extra: Options, interceptors: Interceptors) -> grpc.aio.Channel:
        merged = (*base, *extra)
        if credentials is not None:
            return grpc.aio.secure_channel(
                target, credentials, options=merged, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(target, options=merged, interceptors=interceptors)

    return make


def _status_code(call: Any) -> int | None:
    """The status code of an ended aio call, read without awaiting (a done-callback cannot).

    grpc.aio has only ``await call.code()``; its Cython call holds the status once done, and
    an intercepted call holds the call its interceptors made. None when neither can be read.
    """
    try:
        inner = getattr(call, "_cython_call", None)
        if inner is None:
            inner = call._interceptors_task.result()._cython_call
        code: int = inner._status.code()
    except (AttributeError, TypeError, asyncio.InvalidStateError, asyncio.CancelledError):
        return None
    except grpc.RpcError:  # the interceptors' task ended with the call's error
        return None
    return code


def _answered_by_pod(call: Any) -> bool:
    """Whether an ended aio call's trailers name the pod that sent its status (read as
    :func:`_status_code` reads the code); False when they cannot be read."""
    try:
        inner = getattr(call, "_cython_call", None)
        if inner is None:
            inner = call._interceptors_task.result()._cython_call
        return names_a_pod(inner._status.trailing_metadata())
    except (AttributeError, TypeError, asyncio.InvalidStateError, asyncio.CancelledError):
        return False
    except grpc.RpcError:
        return False


def _pod_gone(error: grpc.aio.AioRpcError) -> bool:
    """Failed UNAVAILABLE, and no pod sent that status (see the sync channel's ``_pod_gone``)."""
    return bool(
        error.code() is grpc.StatusCode.UNAVAILABLE and not names_a_pod(error.trailing_metadata())
    )


class _PastHealthChecks(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Lets the lane's own health checks past the observing interceptor: they are the channel's
    housekeeping (every few seconds per lane, and every scout), not the user's calls, and would
    otherwise be spans and detector samples."""

    def __init__(self, observing: grpc.aio.UnaryUnaryClientInterceptor) -> None:
        self._observing = observing

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        if client_call_details.method in _HEALTH_CHECK:
            return await continuation(client_call_details, request)
        return await self._observing.intercept_unary_unary(
            continuation, client_call_details, request
        )


class _LaneConnection:
    __slots__ = ("callables", "channel", "check")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.check = check_method(channel, lenient=True)
        self.callables: dict[Any, Any] = {}


class _Balanced:
    """One method of the balanced channel: per call, a lane and that lane's multicallable."""

    def __init__(
        self,
        owner: BalancedChannel,
        kind: str,
        method: str,
        request_serializer: Any,
        response_deserializer: Any,
        registered: bool | None,
    ) -> None:
        self._owner = owner
        self._pool = owner.pool
        self._kind = kind
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer
        self._registered = registered

    def _inner(self, lane: Lane) -> Any:
        connection: _LaneConnection = lane.connection
        inner = connection.callables.get(self)
        if inner is None:
            make = getattr(connection.channel, self._kind)
            args = (self._method, self._serializer, self._deserializer)
            inner = make(*args, _registered_method=True) if self._registered else make(*args)
            connection.callables[self] = inner
        return inner

    def _attempt(self, request: Any, kwargs: dict[str, Any]) -> tuple[Any, Lane | None]:
        """One call on one lane; the lane is given back by the call's done-callback."""
        pool = self._pool
        try:
            lane = pool.acquire()
        except NoLane as error:  # as a grpc.aio channel without a connection: UNAVAILABLE
            return _Unavailable(str(error)), None
        try:
            if self._kind.startswith("stream") and isinstance(request, (list, tuple)):
                request = iter(request)  # replayable: a fresh iterator for each attempt
            call = self._inner(lane)(request, **kwargs)
        except BaseException:  # the call never started: give the lane back, re-raise as is
            pool.release(lane)
            raise
        call.add_done_callback(partial(self._owner.released, lane))
        return call, lane

    def _call(self, request: Any, **kwargs: Any) -> Any:
        owner = self._owner
        owner.start()
        policy = owner.retry
        policy.record_call()
        streaming = self._kind.startswith("stream")
        if not policy.retryable(self._method, request, streaming=streaming):
            return self._attempt(request, kwargs)[0]
        deadline = Deadline(kwargs.pop("timeout", None))

        def start() -> tuple[Any, Lane | None]:
            return self._attempt(request, {**kwargs, "timeout": deadline.remaining()})

        if not self._kind.endswith("unary"):
            return _RetryingLaneStream(start, self._pool, policy, deadline, owner.sleep)

        async def run(holder: RetryingCall) -> Any:
            async def attempt() -> Any:
                holder.last, lane = start()
                try:
                    return await holder.last
                except grpc.aio.AioRpcError as error:
                    if lane is not None and _pod_gone(error):
                        # Now, not in the done-callback (it may not have run yet): the next
                        # attempt must not pick the same lane.
                        self._pool.lane_failed(lane)
                    raise

            return await acall_with_retries(policy, deadline, attempt, owner.sleep)

        return RetryingCall(run)


class _Unavailable:
    """A call that could not start: no lane has a connection. It fails UNAVAILABLE when awaited
    or read, as a grpc.aio call on a channel without a connection does."""

    def __init__(self, details: str) -> None:
        self._error = grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details
        )

    def __await__(self) -> Generator[Any, None, Any]:
        raise self._error
        yield  # pragma: no cover - makes this a generator

    async def read(self) -> Any:
        raise self._error

    async def write(self, _message: Any) -> None:
        raise self._error

    async def done_writing(self) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        raise self._error
        yield  # pragma: no cover - makes this an async generator

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    async def details(self) -> str:
        return str(self._error.details())

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def wait_for_connection(self) -> None:
        raise self._error

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        callback(self)

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None


class _RetryingLaneStream:
    """A response stream sent again, on another lane, when it fails before its first message;
    after that, a failure is the caller's. The first attempt starts at once; the retries
    happen in the first ``read()`` (or the first step of ``async for``)."""

    def __init__(
        self,
        start: Callable[[], tuple[Any, Lane | None]],
        pool: LanePool,
        policy: RetryPolicy,
        deadline: Deadline,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._start = start
        self._pool = pool
        self._policy = policy
        self._deadline = deadline
        self._sleep = sleep
        self._committed = False
        self._call, self._lane = start()

    async def read(self) -> Any:
        if self._committed:
            return await self._call.read()
        first = True

        async def attempt() -> Any:
            nonlocal first
            if not first:
                self._call, self._lane = self._start()
            first = False
            try:
                return await failed_as_error(self._call, await self._call.read())
            except grpc.aio.AioRpcError as error:
                if self._lane is not None and _pod_gone(error):
                    self._pool.lane_failed(self._lane)
                raise

        try:
            return await acall_with_retries(self._policy, self._deadline, attempt, self._sleep)
        finally:
            self._committed = True

    async def _responses(self) -> AsyncIterator[Any]:
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    def __getattr__(self, name: str) -> Any:
        # write, done_writing, code, details, metadata, cancel, done, ...: the attempt's own.
        return getattr(self._call, name)


class _UnaryRequest(_Balanced):
    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._call(
            request,
            timeout=timeout,
            metadata=metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )


class _StreamRequest(_Balanced):
    def __call__(
        self,
        request_iterator: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        return self._call(
            request_iterator,
            timeout=timeout,
            metadata=metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )


class _UnaryUnary(_UnaryRequest, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _UnaryStream(_UnaryRequest, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    pass


class _StreamUnary(_StreamRequest, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _StreamStream(_StreamRequest, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    pass


class BalancedChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio.Channel`` that spreads calls over lanes to distinct pods.

    Made by :func:`balanced_channel`; this constructor takes a channel factory. The
    arguments are those of :class:`grpc_balance_mw.channel.BalancedChannel`. Its maintenance
    task starts with the first call, or here if an event loop is running.
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
    ) -> None:
        if check_timeout_s <= 0 or tick_s <= 0:
            raise ConfigurationError("check_timeout_s and tick_s must be > 0")
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
        self._factory = factory
        self.detector: AffinityDetector = detector_for(target, self._options)
        # The target's calls (these at least) run on lanes: an alarm's advice is not to use them.
        self.detector.lanes_opened()
        self._check_timeout_s = check_timeout_s
        self._tick_s = tick_s
        self._task: asyncio.Task[None] | None = None
        self._followers: set[asyncio.Task[None]] = set()
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
            self._task = loop.create_task(
                self._maintain(first), name=f"balanced-channel {self.target}"
            )

    def released(self, lane: Lane, call: Any) -> None:
        """A call on ``lane`` ended (its done-callback): give the lane back."""
        code = _status_code(call)
        self.pool.release(
            lane,
            code == _UNAVAILABLE and not _answered_by_pod(call),
            timed_out=code == _DEADLINE_EXCEEDED,
        )
        if code is None and not self._closed:
            follower = asyncio.get_running_loop().create_task(self._follow(lane, call))
            self._followers.add(follower)
            follower.add_done_callback(self._followers.discard)

    async def _follow(self, lane: Lane, call: Any) -> None:
        with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
            if await call.code() is grpc.StatusCode.UNAVAILABLE and not names_a_pod(
                await call.trailing_metadata()
            ):
                self.pool.lane_failed(lane)

    # -- lanes -----------------------------------------------------------------------------

    def _open(self, lane: Lane) -> None:
        lane.connection = _LaneConnection(
            self._factory((LOCAL_POOL_OPTION,), self._interceptors(lane))
        )

    def _interceptors(self, lane: Lane) -> Interceptors:
        """The one place a lane's calls are observed."""
        if not self._observe:
            return ()
        observing = affinity_interceptors(
            self.target, self._options.but(lane=lane.name, probe=False)
        )
        return [
            _PastHealthChecks(interceptor)
            if isinstance(interceptor, grpc.aio.UnaryUnaryClientInterceptor)
            else interceptor
            for interceptor in observing
        ]

    def _signals(self) -> Signals:
        if not self._observe:
            return Signals()
        snapshot = self.detector.snapshot()
        return Signals(snapshot.state.value, snapshot.top_pod, snapshot.known_count)

    async def _maintain(self, first: Plan | None) -> None:
        plan = first
        burst = 0
        while True:
            try:
                if plan is None:
                    plan = self.pool.plan(signals=self._signals())
                busy = bool(plan.dial)
                await self._carry_out(plan)
            except asyncio.CancelledError:
                raise
            except Exception:  # a background task: nothing above it would see the error
                _log.exception("balanced channel %s: maintenance round failed", self.target)
                busy = False
            plan = None
            burst = burst + 1 if busy and burst < _BURST_ROUNDS else 0
            await asyncio.sleep(0 if burst else self._tick_s)

    async def _carry_out(self, plan: Plan) -> None:
        await self._close_lanes(plan.close)
        if plan.stuck is not None:
            _log.warning("balanced channel %s: %s", self.target, plan.stuck.message)
        for lane in plan.drain:
            _log.debug("balanced channel %s: %r drains", self.target, lane)
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
            return read_check(error.code().name, False, None, error.trailing_metadata())
        return read_reply(response, await call.initial_metadata(), await call.trailing_metadata())

    async def _close_lanes(self, lanes: Sequence[Lane], grace: float | None = None) -> None:
        channels = []
        for lane in lanes:
            connection: _LaneConnection | None = lane.connection
            if connection is not None:
                connection.callables.clear()
                channels.append(connection.channel.close(grace))
        await asyncio.gather(*channels)

    def _any_channel(self) -> grpc.aio.Channel:
        self.start()
        lane = self.pool.acquire()
        self.pool.release(lane)
        connection: _LaneConnection = lane.connection
        return connection.channel

    # -- grpc.aio.Channel ------------------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable:
        return _UnaryUnary(
            self, "unary_unary", method, request_serializer, response_deserializer,
            _registered_method,
        )  # fmt: skip

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable:
        return _UnaryStream(
            self, "unary_stream", method, request_serializer, response_deserializer,
            _registered_method,
        )  # fmt: skip

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable:
        return _StreamUnary(
            self, "stream_unary", method, request_serializer, response_deserializer,
            _registered_method,
        )  # fmt: skip

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable:
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer,
            _registered_method,
        )  # fmt: skip

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The state of one lane (the channel's state is its lanes'; one stands for them)."""
        return self._any_channel().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._any_channel().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._any_channel().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Stop the maintenance task and close every lane (``grace`` as grpc.aio's close)."""
        if not self._closed:  # once per channel (one loop: no race)
            self.detector.lanes_opened(False)
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for follower in list(self._followers):
            follower.cancel()
        await self._close_lanes(self.pool.close(), grace)

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
) -> BalancedChannel:
    """A balanced ``grpc.aio`` channel to ``target``, made as ``grpc.aio.secure_channel`` (with
    ``credentials``) or ``grpc.aio.insecure_channel`` would make one; the arguments are those
    of :func:`grpc_balance_mw.channel.balanced_channel` (``factory`` also takes the lane's
    interceptors)."""
    if factory is not None and (credentials is not None or options):
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
        factory if factory is not None else channel_factory(target, credentials, options),
        target,
        pool=pool,
        observe=observe,
        retry=retry,
    )
