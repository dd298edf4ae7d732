"""The sync ``grpc.Channel`` facade of the routing core: the four call kinds from one table.

A :class:`RoutedChannel` makes its calls on routes that a :class:`SyncRouter` hands out: the
balanced channel's lanes (:mod:`grpc_balance_mw.balanced`) or dial-per-request's fresh
connections (:mod:`grpc_balance_mw.dial_per_request`). The per-call routine is written once, here:

- take a route (with ``wait_for_ready=True``, wait for one up to the call's deadline, as a grpc
  channel waits for its connection);
- attempt the call on the route's own multicallable;
- classify how it ended (:func:`grpc_balance_mw._routing.outcome_of`) and give the route back
  exactly once (:class:`~grpc_balance_mw._routing.Ticket`): a unary call when it returns, a
  ``future()`` from its done-callback, a response stream when it ends, fails, is cancelled or
  done, or is garbage-collected half-read (``weakref.finalize``: grpcio runs no done-callback
  for a dropped stream);
- send it again when the :class:`~grpc_balance_mw.retry.RetryPolicy` says so: a unary-response
  call by :func:`~grpc_balance_mw.retry.call_with_retries`, a response stream only before its
  first message (the first attempt starts at once, as grpcio's calls do; the retries happen in
  the first ``next()``); ``future()`` calls are sent once. A call that never left the client is
  sent again whether or not its method is marked idempotent.

Done-callbacks run on the route's channel thread (grpcio's), so the router is told
``in_callback=True`` there and must not wait (closing a channel there can deadlock).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import grpc

from grpc_balance_mw._routing import (
    NO_OUTCOME,
    OK,
    MethodSpec,
    NoLaneError,
    NoRoute,
    Outcome,
    Ticket,
    channel_method,
    error_outcome,
    outcome_of,
    request_for_attempt,
)
from grpc_balance_mw.response_stream import ResponseStream
from grpc_balance_mw.retry import Deadline, RetryPolicy, call_with_retries

__all__ = ["MethodSpec", "NoLaneError", "RoutedChannel", "SyncRouter"]

Route = TypeVar("Route")
#: How often a ``wait_for_ready`` call asks again for a route while there is none.
WAIT_POLL_S = 0.02


class SyncRouter(Protocol[Route]):
    """What a sync channel flavour plugs into :class:`RoutedChannel`."""

    def acquire(self, wait_for_ready: bool) -> Route:
        """The route for one attempt, or :class:`~grpc_balance_mw._routing.NoRoute` when there
        is none now (``wait_for_ready``: the caller would wait for a connected one)."""

    def multicallable(self, route: Route, spec: MethodSpec) -> Any:
        """``spec``'s multicallable on ``route``'s channel."""

    def release(self, route: Route, outcome: Outcome, in_callback: bool) -> None:
        """The attempt on ``route`` ended; exactly once per route."""

    def reads_trailers(self, route: Route) -> bool:
        """Whether a successful attempt's outcome should carry its trailing metadata."""

    def started(self) -> float | None:
        """When an attempt starts now, if the router times calls (else None)."""


def call_outcome(call: Any, trailers: bool = False) -> Outcome:
    """The outcome of an ended sync call (a done-callback: ``code()`` does not wait);
    ``trailers``: with its trailing metadata whatever its status (for load reports)."""
    code = call.code()
    read = trailers or code is grpc.StatusCode.UNAVAILABLE
    return outcome_of(code, call.trailing_metadata() if read else None)


def _ended(ticket: Ticket[Any], call: Any) -> None:
    """A done-callback: the call ended; give its route back (on grpcio's thread)."""
    ticket.release(call_outcome(call, ticket.reads_trailers()), True)


class _Retry(NamedTuple):
    """A call that may be sent again: its policy, deadline, how retries sleep."""

    policy: RetryPolicy
    deadline: Deadline
    sleep: Callable[[float], None]
    idempotent: bool


class RoutedStream(ResponseStream):
    """A response stream that gives its route back however it ends, and (``retry``) is sent
    again, on another route, when it fails before its first message. The call's methods
    answer for the current attempt."""

    def __init__(
        self, start: Callable[[], tuple[Any, Ticket[Any] | None]], retry: _Retry | None
    ) -> None:
        self._start = start
        self._retry = retry
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._bind(*start())

    def _bind(self, call: Any, ticket: Ticket[Any] | None) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        self._call = call
        self._ticket = ticket
        if ticket is not None:
            call.add_done_callback(partial(_ended, ticket))
            # A stream dropped half-read is garbage-collected without a done-callback.
            self._finalizer = weakref.finalize(self, ticket.release, NO_OUTCOME, True)

    def _release(self, outcome: Outcome) -> None:
        if self._ticket is not None:
            self._ticket.release(outcome, False)

    def _next(self) -> Any:
        try:
            return next(self._call)
        except StopIteration:
            ticket = self._ticket
            if ticket is not None and ticket.reads_trailers():
                self._release(outcome_of(grpc.StatusCode.OK, self._call.trailing_metadata()))
            else:
                self._release(OK)
            raise
        except grpc.RpcError as error:
            self._release(error_outcome(error))
            raise

    def __next__(self) -> Any:
        retry = self._retry
        if retry is None:
            return self._next()
        self._retry = None  # committed after this read, whatever it gives
        first = True

        def attempt() -> Any:
            nonlocal first
            if not first:
                self._bind(*self._start())
            first = False
            return self._next()

        return call_with_retries(
            retry.policy, retry.deadline, attempt, retry.sleep, idempotent=retry.idempotent
        )


class _Method(Generic[Route]):
    """One method of a routed channel: per attempt, a route and that route's multicallable."""

    def __init__(self, owner: RoutedChannel[Route], spec: MethodSpec) -> None:
        self._owner = owner
        self._router = owner.router
        self._spec = spec
        self._stream_request = spec.kind.startswith("stream")

    def _retry(self, request: Any, timeout: float | None) -> _Retry | None:
        """Count the call into the retry budget; how it may be sent again, if at all."""
        owner = self._owner
        policy = owner.retry
        policy.record_call()
        streaming = self._stream_request
        idempotent = policy.retryable(self._spec.method, request, streaming=streaming)
        if not idempotent and not policy.may_resend(request, streaming=streaming):
            return None
        return _Retry(policy, Deadline(timeout), owner.sleep, idempotent)

    def _route(self, wait_for_ready: bool | None, deadline: Deadline | None) -> Route:
        """A route now; with ``wait_for_ready``, the first one up to the deadline."""
        router = self._router
        try:
            return router.acquire(bool(wait_for_ready))
        except NoRoute as error:
            if not wait_for_ready:
                raise NoLaneError(str(error)) from error
            failed = error
        while not self._owner.closed:
            left = None if deadline is None else deadline.remaining()
            if left is not None and left <= 0:
                break
            time.sleep(WAIT_POLL_S if left is None else min(WAIT_POLL_S, left))
            try:
                return router.acquire(True)
            except NoRoute as error:
                failed = error
        raise NoLaneError(str(failed)) from failed

    def _start(
        self, request: Any, deadline: Deadline, rest: tuple[Any, ...]
    ) -> tuple[Any, Ticket[Route] | None]:
        """Start one attempt of a response stream: (the call, its ticket)."""
        try:
            route = self._route(rest[2], deadline)
        except NoLaneError as error:  # fails when read, as grpc's streams do: retryable
            return error, None
        router = self._router
        try:
            call = router.multicallable(route, self._spec)(
                request_for_attempt(self._stream_request, request), deadline.remaining(), *rest
            )
        except BaseException:  # the call never started: give the route back, re-raise as is
            router.release(route, NO_OUTCOME, False)
            raise
        return call, Ticket(router, route)


class _UnaryResponse(_Method[Route]):
    def _attempt(
        self, how: str, request: Any, timeout: float | None, deadline: Deadline | None,
        rest: tuple[Any, ...],
    ) -> Any:  # fmt: skip
        """One attempt on one route (``how``: ``__call__`` or ``with_call``)."""
        router = self._router
        if rest[2]:
            route = self._route(True, deadline)
        else:  # _route without waiting, one frame less on the common call
            try:
                route = router.acquire(False)
            except NoRoute as error:
                raise NoLaneError(str(error)) from error
        if deadline is not None:
            timeout = deadline.remaining()
        outcome = OK
        # Unary calls only are timed (Peak-EWMA): a request stream's time is the caller's.
        started = None if self._stream_request else router.started()
        try:
            inner = router.multicallable(route, self._spec)
            if self._stream_request:
                request = request_for_attempt(True, request)
            if not router.reads_trailers(route):
                result = getattr(inner, how)(request, timeout, *rest)
                if started is not None:
                    outcome = outcome_of(grpc.StatusCode.OK, None, started)
                return result
            # The router reads load reports: the call object (with_call) has the trailers.
            response, call = inner.with_call(request, timeout, *rest)
            outcome = outcome_of(grpc.StatusCode.OK, call.trailing_metadata(), started)
            return (response, call) if how == "with_call" else response
        except grpc.RpcError as error:
            outcome = error_outcome(error)
            raise
        except BaseException:
            outcome = NO_OUTCOME
            raise
        finally:
            router.release(route, outcome, False)

    def _invoke(self, how: str, request: Any, timeout: float | None, rest: tuple[Any, ...]) -> Any:
        retry = self._retry(request, timeout)
        if retry is None:
            wait = rest[2] and timeout is not None
            return self._attempt(how, request, timeout, Deadline(timeout) if wait else None, rest)
        # A failed attempt's route takes no more calls (its pod went away): the next attempt
        # goes to another one, within what is left of the call's deadline.
        deadline = retry.deadline
        return call_with_retries(
            retry.policy,
            deadline,
            lambda: self._attempt(how, request, None, deadline, rest),
            retry.sleep,
            idempotent=retry.idempotent,
        )

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        policy = self._owner.retry
        rest = (metadata, credentials, wait_for_ready, compression)
        if wait_for_ready or policy.max_attempts > 1:
            return self._invoke("__call__", request, timeout, rest)
        # The common call, sent once on a route had now: no retry plan to make.
        policy.record_call()
        return self._attempt("__call__", request, timeout, None, rest)

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> tuple[Any, grpc.Call]:
        rest = (metadata, credentials, wait_for_ready, compression)
        return self._invoke("with_call", request, timeout, rest)  # type: ignore[no-any-return]

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        """Sent once, never retried."""
        self._owner.retry.record_call()
        route = self._route(wait_for_ready, Deadline(timeout) if wait_for_ready else None)
        router = self._router
        try:
            future = router.multicallable(route, self._spec).future(
                request_for_attempt(self._stream_request, request), timeout, metadata,
                credentials, wait_for_ready, compression,
            )  # fmt: skip
        except BaseException:  # the call never started: give the route back, re-raise as is
            router.release(route, NO_OUTCOME, False)
            raise
        future.add_done_callback(partial(_ended, Ticket(router, route)))
        return future


class _StreamResponse(_Method[Route]):
    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> RoutedStream:
        rest = (metadata, credentials, wait_for_ready, compression)
        retry = self._retry(request, timeout)
        deadline = retry.deadline if retry is not None else Deadline(timeout)
        return RoutedStream(partial(self._start, request, deadline, rest), retry)


class _UnaryUnary(_UnaryResponse[Route], grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _StreamUnary(_UnaryResponse[Route], grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _UnaryStream(_StreamResponse[Route], grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    pass


class _StreamStream(_StreamResponse[Route], grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    pass


#: The four call kinds: the multicallable class of each.
_KINDS: dict[str, type[_Method[Any]]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}


class RoutedChannel(grpc.Channel, Generic[Route]):  # type: ignore[misc]
    """A ``grpc.Channel`` whose calls go over the routes of ``router`` (see the module doc).

    A subclass is its own router (``acquire``, ``multicallable``, ``release``: no reference
    cycle, so an unclosed channel is freed with its last reference); it sets ``retry``,
    ``sleep`` and ``_connectivity``, and defines ``closed`` and ``close()``.
    """

    retry: RetryPolicy
    sleep: Callable[[float], None]

    @property
    def router(self) -> SyncRouter[Route]:
        return self

    @property
    def closed(self) -> bool:
        """Whether the channel is closed (a ``wait_for_ready`` call stops waiting)."""
        return False

    def _method(self, spec: MethodSpec) -> Any:
        return _KINDS[spec.kind](self, spec)

    _connectivity: Connectivity

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        """Connectivity of the target, told by a connection of the channel's own (routes are
        retired or closed under a subscription): ``grpc.channel_ready_future`` completes once
        the target can be reached."""
        self._connectivity.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        self._connectivity.unsubscribe(callback)

    unary_unary = channel_method("unary_unary")
    unary_stream = channel_method("unary_stream")
    stream_unary = channel_method("stream_unary")
    stream_stream = channel_method("stream_stream")


class Connectivity:
    """A channel's connectivity, told by one connection of its own to the target, kept for
    that purpose only: the routes come and go (a retired lane, a call's closed connection),
    and grpcio's polling thread must never be left subscribed to a channel this package
    closes. Dialled on the first ``subscribe``; closed with the channel."""

    def __init__(self, dial: Callable[[], grpc.Channel]) -> None:
        self._dial = dial
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def channel(self) -> grpc.Channel:
        with self._lock:
            if self._channel is None:
                self._channel = self._dial()
            return self._channel

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool) -> None:
        self.channel().subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        with self._lock:
            channel = self._channel
        if channel is not None:
            channel.unsubscribe(callback)

    def close(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
