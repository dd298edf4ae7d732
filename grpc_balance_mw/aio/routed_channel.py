"""The ``grpc.aio.Channel`` facade of the routing core: the four call kinds from one table.

The same per-call routine as the sync :mod:`grpc_balance_mw.routed_channel`, on the same pure
decisions (:mod:`grpc_balance_mw._routing`, :class:`~grpc_balance_mw.retry.RetryPolicy`):
take a route from an :class:`AioRouter` (the aio balanced channel's lanes, aio
dial-per-request's fresh connections), make the call on it, give the route back exactly once,
and send the call again when the policy says so.

- A call that is sent once and need not wait is the route's own grpc.aio call, returned as it
  is; a done-callback reads its final status and metadata off the finished call (no task, no
  await), gives the route back and reports the pod to the route's observer, the way aio
  ``observe()`` does. A response stream is also given back if it is garbage-collected
  (``weakref.finalize``), whatever grpcio does with a dropped call.
- Metadata is checked before a route is taken (TypeError at once, as grpc.aio raises it).
- A unary-response call that may be sent again, or that waits for a route
  (``wait_for_ready=True`` while no route is connected), runs its attempts in a task
  (:class:`RetryingCall`: ``code()``, ``details()`` and the metadata are the last attempt's);
  a response stream retries in its first ``read()`` (:class:`RoutedStream`), until its first
  message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Sequence
from functools import partial
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import grpc

from grpc_balance_mw._routing import (
    NO_OUTCOME,
    OK,
    MethodSpec,
    NoRoute,
    Outcome,
    Ticket,
    channel_method,
    check_metadata,
    error_outcome,
    outcome_of,
    request_for_attempt,
)
from grpc_balance_mw._routing import NoLaneError as SyncNoLaneError
from grpc_balance_mw.affinity.observer import CallObserver, ObservedCall
from grpc_balance_mw.aio._grpcio import final_state, when_done
from grpc_balance_mw.retry import Deadline, RetryPolicy, acall_with_retries, code_of

__all__ = [
    "AioRouter",
    "Connectivity",
    "MethodSpec",
    "NoLaneError",
    "RetryingCall",
    "RoutedChannel",
    "RoutedStream",
    "check_interceptors",
    "failed_as_error",
]

_log = logging.getLogger(__name__)

Route = TypeVar("Route")
#: How often a ``wait_for_ready`` call asks again for a route while there is none.
WAIT_POLL_S = 0.02
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_OK_CODE = grpc.StatusCode.OK
_OK = _OK_CODE.value[0]
_INTERCEPTOR_KINDS = (
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
)


class AioRouter(Protocol[Route]):
    """What an aio channel flavour plugs into :class:`RoutedChannel`."""

    def acquire(self, wait_for_ready: bool) -> Route:
        """The route for one attempt, or :class:`~grpc_balance_mw._routing.NoRoute`."""

    def multicallable(self, route: Route, spec: MethodSpec) -> Any:
        """``spec``'s multicallable on ``route``'s channel."""

    def observer(self, route: Route) -> CallObserver | None:
        """Who is told which pod served a call on ``route`` (None: nobody)."""

    def release(self, route: Route, outcome: Outcome, in_callback: bool) -> None:
        """The attempt on ``route`` ended; exactly once per route."""

    def reads_trailers(self, route: Route) -> bool:
        """Whether a successful attempt's outcome should carry its trailing metadata."""

    def started(self) -> float | None:
        """When an attempt starts now, if the router times calls (else None)."""


def check_interceptors(interceptors: Sequence[Any] | None) -> list[Any]:
    """``interceptors`` as a list, or the ValueError grpc.aio raises for one of no known kind
    (here when the channel is made, not at its first dial)."""
    for interceptor in interceptors or ():
        if not isinstance(interceptor, _INTERCEPTOR_KINDS):
            raise ValueError(
                f"Interceptor {interceptor} must be UnaryUnaryClientInterceptor or "
                "UnaryStreamClientInterceptor or StreamUnaryClientInterceptor or "
                "StreamStreamClientInterceptor."
            )
    return list(interceptors or ())


class _Watch(Ticket[Any]):
    """One attempt's hold on its route (a :class:`Ticket`) and what it reports when it ends:
    one object per call, whose ``ended`` is the call's done-callback."""

    __slots__ = ("began", "observed", "observer", "started", "stream")

    def __init__(
        self, router: AioRouter[Any], route: Any, observer: CallObserver | None, spec: MethodSpec
    ) -> None:
        super().__init__(router, route)
        # Unary calls only are timed (Peak-EWMA): a stream's life is not a latency.
        self.began = router.started() if spec.kind == "unary_unary" else None
        self.observer = observer
        self.observed: ObservedCall | None = None
        self.started: float | None = None
        if observer is not None:
            self.stream = spec.kind != "unary_unary"
            if observer.telemetry is not None:
                self.observed = observer.begin(spec.method, spec.kind)
            elif self.stream:
                self.started = observer.clock()

    def ended(self, call: Any) -> None:
        """The call's done-callback."""
        state = final_state(call)
        if state is None:  # another grpcio's layout, or an intercepted call that failed
            _follow(self, call)
        else:
            self.report(*state)

    def report(self, initial: Any, trailing: Any, number: int | None) -> None:
        if number == _OK:
            reads = self.reads_trailers()
            if reads or self.began is not None:
                self.release(outcome_of(_OK_CODE, trailing if reads else None, self.began), True)
            else:
                self.release(OK, True)
        else:
            self.release(outcome_of(None if number is None else _CODES.get(number), trailing), True)
        observer = self.observer
        if observer is None:
            return
        try:
            if self.observed is not None:
                self.observed.finish(initial, trailing, number)
            elif self.started is None:
                observer.count_unary(initial, trailing)
            else:
                observer.count(self.started, self.stream, initial, trailing)
        except Exception:  # telemetry must never fail a call
            _log.exception("observing a call failed")


_followers: set[asyncio.Task[None]] = set()


def _follow(watch: _Watch, call: Any) -> None:
    task = asyncio.get_running_loop().create_task(_await_final_state(watch, call))
    _followers.add(task)
    task.add_done_callback(_followers.discard)


async def _await_final_state(watch: _Watch, call: Any) -> None:
    """The slow way, for calls whose state cannot be read directly."""
    try:
        initial = await call.initial_metadata()
        code = await call.code()
        trailing = await call.trailing_metadata()
    except (asyncio.CancelledError, grpc.RpcError):
        initial, trailing, code = None, None, grpc.StatusCode.CANCELLED
    watch.report(initial, trailing, code.value[0] if code is not None else None)


class NoLaneError(grpc.aio.AioRpcError, SyncNoLaneError):  # type: ignore[misc]
    """UNAVAILABLE: the channel has no route with a connection now. The sync channels'
    :class:`grpc_balance_mw.routed_channel.NoLaneError` (``except NoLaneError`` catches both
    flavours), and a ``grpc.aio.AioRpcError``, as a grpc.aio channel without a connection
    fails a call; its ``code()``, ``details()`` and metadata are grpc.aio's."""

    def __init__(self, details: str = "") -> None:
        grpc.aio.AioRpcError.__init__(
            self, grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details
        )


class _Unavailable:
    """A call that could not start: no route has a connection. It fails UNAVAILABLE
    (:class:`NoLaneError`) when awaited or read, as a grpc.aio call on a channel without a
    connection does."""

    def __init__(self, details: str) -> None:
        self.error = NoLaneError(details)

    def __await__(self) -> Generator[Any, None, Any]:
        raise self.error
        yield  # pragma: no cover - makes this a generator

    async def read(self) -> Any:
        raise self.error

    async def write(self, _message: Any) -> None:
        raise self.error

    async def done_writing(self) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        raise self.error
        yield  # pragma: no cover - makes this an async generator

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    async def details(self) -> str:
        return str(self.error.details())

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def wait_for_connection(self) -> None:
        raise self.error

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


async def failed_as_error(call: Any, response: Any) -> Any:
    """``response`` of a stream's first ``read()``, or the call's error if that read ended the
    stream with a failure: an intercepted grpc.aio stream can end a failed read with EOF and
    leave the status in ``code()``, which a retry would otherwise take for an empty stream."""
    if response is not grpc.aio.EOF:
        return response
    code = await call.code()
    if code is grpc.StatusCode.OK:
        return response
    raise grpc.aio.AioRpcError(
        code,
        await call.initial_metadata() or grpc.aio.Metadata(),
        await call.trailing_metadata() or grpc.aio.Metadata(),
        await call.details(),
    )


class RetryingCall:
    """A unary-response call whose attempts run in a task (retried, or waiting for a route);
    ``code()``, ``details()`` and the metadata are the last attempt's."""

    def __init__(self, run: Callable[[RetryingCall], Coroutine[Any, Any, Any]]) -> None:
        self.last: Any = None  # the current (last) attempt's call
        self._callbacks: list[Callable[[Any], None]] = []
        self._task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(run(self))
        self._task.add_done_callback(self._done)

    def _done(self, _task: object) -> None:
        for callback in self._callbacks:
            callback(self)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    async def _settled(self) -> Any:
        await asyncio.wait([self._task])
        return self.last

    async def code(self) -> grpc.StatusCode:
        last = await self._settled()
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        if last is None:  # no attempt got a call (e.g. no connection): the error says why
            return code_of(self._task.exception()) or grpc.StatusCode.UNKNOWN
        return await last.code()

    async def details(self) -> str | None:
        last = await self._settled()
        if last is None:
            error = None if self._task.cancelled() else self._task.exception()
            return None if error is None else str(getattr(error, "details", lambda: error)())
        details: str | None = await last.details()
        return details

    async def initial_metadata(self) -> Any:
        last = await self._settled()
        return None if last is None else await last.initial_metadata()

    async def trailing_metadata(self) -> Any:
        last = await self._settled()
        return None if last is None else await last.trailing_metadata()

    async def wait_for_connection(self) -> None:
        while self.last is None and not self._task.done():
            await asyncio.sleep(0)
        if self.last is not None:
            await self.last.wait_for_connection()

    def cancel(self) -> bool:
        return self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return None if self.last is None else self.last.time_remaining()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._task.done():
            callback(self)
        else:
            self._callbacks.append(callback)


#: A call's metadata, credentials, wait_for_ready and compression, as given.
_Rest = tuple[Any, Any, Any, Any]


class _Plan(NamedTuple):
    """How one call is sent: its deadline, whether it may be sent again and why."""

    policy: RetryPolicy
    deadline: Deadline
    resend: bool
    idempotent: bool
    wait_for_ready: bool


class RoutedStream:
    """A response stream that gives its route back however it ends, the wrapper being
    garbage-collected included (``async for ...: break`` drops it; grpcio's own call object
    would wait for the cyclic garbage collector). With a ``plan``, its first ``read()`` (or
    first step of ``async for``) waits for a route and retries, on another route, until the
    first message; after that, a failure is the caller's. The call's methods answer for the
    current attempt."""

    def __init__(self, method: _Method[Any], plan: _Plan | None, start: Callable[[], Any]) -> None:
        self._method = method
        self._plan = plan
        self._start = start
        self._committed = plan is None
        self._call: Any = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        try:
            self._bind(*start())
        except NoRoute:  # only when waiting for a route: the first read() waits
            self._call = None

    def _bind(self, call: Any, ticket: Ticket[Any]) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._call = call
        self._ticket = ticket
        self._finalizer = weakref.finalize(self, ticket.release, NO_OUTCOME, True)

    async def _attempt(self, first: bool) -> Any:
        assert self._plan is not None
        if self._call is None or not first:
            await self._route()
        try:
            return await failed_as_error(self._call, await self._call.read())
        except grpc.aio.AioRpcError as error:
            self._ticket.release(error_outcome(error))  # now: not this route again
            raise

    async def read(self) -> Any:
        if self._committed:
            return await self._call.read()
        first = True

        async def attempt() -> Any:
            nonlocal first
            was_first, first = first, False
            return await self._attempt(was_first)

        plan = self._plan
        assert plan is not None
        try:
            if not plan.resend:
                return await attempt()
            return await acall_with_retries(
                plan.policy, plan.deadline, attempt, self._method.sleep, idempotent=plan.idempotent
            )
        finally:
            self._committed = True

    async def _responses(self) -> AsyncIterator[Any]:
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    def __getattr__(self, name: str) -> Any:
        # write, done_writing, code, details, metadata, cancel, done, ...: the attempt's own.
        call = self.__dict__.get("_call")
        if call is None and name in _AWAITED:
            return partial(self._once_started, name)
        if call is None:
            raise AttributeError(name)
        return getattr(call, name)

    async def _once_started(self, name: str, *args: Any) -> Any:
        """An awaited method of a call still waiting for a route (``wait_for_ready``): wait for
        the route (up to the deadline), start the call, then ask it."""
        if self._call is None:
            # A call that failed before it started: _route leaves a failed call to ask.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._route()
        return await getattr(self._call, name)(*args)

    async def _route(self) -> None:
        """Start an attempt on a route; with none to be had (and not waiting for one), the
        call is a failed one from then on, so that ``code()`` and ``details()`` answer as a
        grpc.aio call's do instead of raising."""
        assert self._plan is not None
        try:
            self._bind(*await self._method.route_and_start(self._plan, self._start))
        except grpc.aio.AioRpcError as error:
            self._call = _Unavailable(error.details() or "")
            raise


#: The awaited methods of a grpc.aio call, which a stream waiting for a route can defer.
_AWAITED = frozenset(
    {
        "write",
        "done_writing",
        "code",
        "details",
        "initial_metadata",
        "trailing_metadata",
        "wait_for_connection",
    }
)


class _Method(Generic[Route]):
    """One method of a routed aio channel (all four kinds: grpc.aio's are one ``__call__``)."""

    def __init__(self, owner: RoutedChannel[Route], spec: MethodSpec) -> None:
        self._owner = owner
        self._router = owner.router
        self._spec = spec
        self._stream_request = spec.kind.startswith("stream")
        self._stream_response = spec.kind.endswith("stream")
        self.sleep = owner.sleep

    def _on(self, route: Route, request: Any, timeout: float | None, rest: _Rest) -> Any:
        """Make the call on ``route``; its done-callback gives the route back."""
        router = self._router
        metadata, credentials, wait_for_ready, compression = rest
        try:
            call = router.multicallable(route, self._spec)(
                request_for_attempt(True, request) if self._stream_request else request,
                timeout=timeout, metadata=metadata, credentials=credentials,
                wait_for_ready=wait_for_ready, compression=compression,
            )  # fmt: skip
        except BaseException:  # the call never started: give the route back, re-raise as is
            router.release(route, NO_OUTCOME, False)
            raise
        watch = _Watch(router, route, router.observer(route), self._spec)
        when_done(call, watch.ended)
        return call, watch

    async def route_and_start(self, plan: _Plan, start: Callable[[], Any]) -> Any:
        """``start()``, waiting for a route up to the deadline if the call waits for ready."""
        while True:
            try:
                return start()
            except NoRoute as error:
                left = plan.deadline.remaining()
                out_of_time = left is not None and left <= 0
                if not plan.wait_for_ready or self._owner.closed or out_of_time:
                    raise _Unavailable(str(error)).error from error
                await asyncio.sleep(WAIT_POLL_S if left is None else min(WAIT_POLL_S, left))

    def __call__(
        self,
        request: Any = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        if metadata is not None:
            check_metadata(metadata)
        owner = self._owner
        owner.start()
        rest = (metadata, credentials, wait_for_ready, compression)
        router = self._router
        policy = owner.retry
        policy.record_call()
        if policy.max_attempts < 2 and not wait_for_ready and not self._stream_response:
            # The common call: sent once, on a route had now, returned as grpc.aio's own call.
            try:
                route = router.acquire(False)
            except NoRoute as error:  # as a grpc.aio channel without a connection
                return _Unavailable(str(error))
            return self._on(route, request, timeout, rest)[0]
        streaming = self._stream_request
        idempotent = policy.retryable(self._spec.method, request, streaming=streaming)
        resend = idempotent or policy.may_resend(request, streaming=streaming)
        if not resend:
            try:
                route = router.acquire(bool(wait_for_ready))
            except NoRoute as error:
                if not wait_for_ready:  # as a grpc.aio channel without a connection
                    return _Unavailable(str(error))
            else:
                started = self._on(route, request, timeout, rest)
                if self._stream_response:
                    return RoutedStream(self, None, lambda: started)
                return started[0]
        plan = _Plan(policy, Deadline(timeout), resend, idempotent, bool(wait_for_ready))

        def start() -> Any:
            route = router.acquire(plan.wait_for_ready)
            return self._on(route, request, plan.deadline.remaining(), rest)

        if self._stream_response:
            return RoutedStream(self, plan, start)

        async def run(holder: RetryingCall) -> Any:
            async def attempt() -> Any:
                call, ticket = await self.route_and_start(plan, start)
                holder.last = call
                try:
                    return await call
                except grpc.aio.AioRpcError as error:
                    ticket.release(error_outcome(error))  # now: not this route again
                    raise

            if not resend:
                return await attempt()
            return await acall_with_retries(
                policy, plan.deadline, attempt, owner.sleep, idempotent=idempotent
            )

        return RetryingCall(run)


class _UnaryUnary(_Method[Route], grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _UnaryStream(_Method[Route], grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    pass


class _StreamUnary(_Method[Route], grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _StreamStream(_Method[Route], grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    pass


#: The four call kinds: the multicallable class of each.
_KINDS: dict[str, type[_Method[Any]]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}


class RoutedChannel(grpc.aio.Channel, Generic[Route]):  # type: ignore[misc]
    """A ``grpc.aio.Channel`` whose calls go over the routes of its router (itself).

    A subclass implements :class:`AioRouter`, sets ``retry``, ``sleep`` and
    ``_connectivity``, and defines ``closed``, ``start()`` (called by every call, on the
    running loop) and ``close()``.
    """

    retry: RetryPolicy
    sleep: Callable[[float], Awaitable[None]]

    @property
    def router(self) -> AioRouter[Route]:
        return self

    @property
    def closed(self) -> bool:
        return False

    def start(self) -> None:
        """Start what needs the running loop (called by each call)."""

    def _method(self, spec: MethodSpec) -> Any:
        return _KINDS[spec.kind](self, spec)

    _connectivity: Connectivity

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The target's connectivity, told by a connection of the channel's own (routes come
        and go): IDLE until something asks to connect."""
        return self._connectivity.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._connectivity.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        """Returns once the target can be reached."""
        await self._connectivity.channel_ready()

    unary_unary = channel_method("unary_unary")
    unary_stream = channel_method("unary_stream")
    stream_unary = channel_method("stream_unary")
    stream_stream = channel_method("stream_stream")


class Connectivity:
    """A channel's connectivity, told by one connection of its own to the target, kept for
    that purpose only (routes come and go). Dialled on first use; closed with the channel."""

    def __init__(self, dial: Callable[[], grpc.aio.Channel]) -> None:
        self._dial = dial
        self._channel: grpc.aio.Channel | None = None

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._dial()
        return self._channel

    def get_state(self, try_to_connect: bool) -> grpc.ChannelConnectivity:
        if self._channel is None and not try_to_connect:
            return grpc.ChannelConnectivity.IDLE
        return self.channel().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.channel().wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.channel().channel_ready()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


def spawn_soon(loop: asyncio.AbstractEventLoop | None, work: Callable[[], None]) -> None:
    """Run ``work`` on ``loop`` (from a done-callback, a finalizer, any thread); dropped once
    the loop is closed (its channels are gone with it)."""
    if loop is None or loop.is_closed():
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        work()
    else:
        loop.call_soon_threadsafe(work)
