"""What the sync interceptor and the sync channel wrapper share: reading a finished call.

grpcio runs a call's done-callbacks on the channel's own event thread, so everything here that a
done-callback uses reads the call's state as it is and never waits on it (see
:func:`headers_now`); the caller's thread, where waiting is safe, may read it the public way.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc

from grpc_balance_mw.affinity.observer import ObservedCall
from grpc_balance_mw.response_stream import ResponseStream

__all__ = [
    "ObservedStream",
    "as_call",
    "final_headers",
    "final_metadata",
    "final_trailers",
    "finish_call",
    "headers_now",
    "metadata_now",
]


def _code(call: Any) -> int | None:
    code = call.code()
    return code.value[0] if code is not None else None


def final_headers(call: Any) -> Any:
    """``call.initial_metadata()`` of a call that has ended, read in the caller's thread.

    grpcio's public method takes the call's condition and builds a closure to wait on it, which
    is a measurable part of the 3 % budget of a warm unary call; once the call has ended (as
    after a successful ``with_call``) the metadata is final and can be read off its state. Any
    other kind of call, or a grpcio without that state, goes through the public method, which may
    wait: never call this from a done-callback (see :func:`headers_now`).
    """
    metadata = getattr(getattr(call, "_state", None), "initial_metadata", None)
    return metadata if metadata is not None else call.initial_metadata()


def final_trailers(call: Any) -> Any:
    """``call.trailing_metadata()`` of a call that has ended, read off its state as
    :func:`final_headers` does (the public method takes the call's condition to wait for the
    end); a call that has not ended, or a grpcio without that state, goes the public way."""
    state = getattr(call, "_state", None)
    if state is not None and getattr(state, "code", None) is not None:
        return state.trailing_metadata
    return call.trailing_metadata()


def final_metadata(call: Any) -> tuple[Any, Any]:
    """``(final_headers(call), final_trailers(call))`` with one look at the call's state: what
    the detection-only hot path reads of every call that has ended."""
    try:
        state = call._state
        if state.code is not None and state.initial_metadata is not None:
            return state.initial_metadata, state.trailing_metadata
    except AttributeError:  # not grpcio's call, or a grpcio without that state
        pass
    return final_headers(call), final_trailers(call)


def headers_now(call: Any) -> Any:
    """The initial metadata a call has received so far, without waiting; None if none yet.

    For done-callbacks. grpcio runs them on the channel's own event thread, and its
    ``initial_metadata()`` waits for an event that only that thread delivers: a stream that ends
    before any response header (UNIMPLEMENTED, a killed pod, a trailers-only abort) would block
    that thread past the call's deadline and wedge every later call on the channel. A call that
    ended without headers had a trailers-only response, so the pod, if any, is in its trailers.
    The state is found on grpcio's calls, through interceptor outcomes (``_call``) and through
    :class:`ObservedStream`; any other kind of call answers None rather than risk the wait.
    """
    return getattr(_state_of(call), "initial_metadata", None)


def metadata_now(call: Any) -> tuple[Any, Any]:
    """``(headers_now(call), trailers)`` with one walk to the call's state, for the
    detection-only done-callback: the trailers off the state once the call has ended, else the
    call's ``trailing_metadata`` method (for the observer to ask when it reads them)."""
    state = _state_of(call)
    if state is None:
        return None, call.trailing_metadata
    ended = getattr(state, "code", None) is not None
    trailers = state.trailing_metadata if ended else call.trailing_metadata
    return getattr(state, "initial_metadata", None), trailers


def _state_of(call: Any) -> Any:
    """grpcio's state of ``call``, through interceptor outcomes (``_call``) and
    :class:`ObservedStream`; None for any other kind of call."""
    for _ in range(4):
        state = getattr(call, "_state", None)
        if state is not None:
            return state
        call = getattr(call, "_call", None)
        if call is None:
            break
    return None


def finish_call(
    observed: ObservedCall, call: Any, *, headers: Callable[[Any], Any] = headers_now
) -> None:
    """Count a finished unary-response call; ``call`` is its ``grpc.Call``, or None if the call
    failed before it was one (e.g. the request did not serialize): no pod, no status.

    Safe as a done-callback: by default it never waits on the call (see :func:`headers_now`);
    the caller's thread may pass ``headers=final_headers`` once the call has ended.
    """
    if call is None:
        observed.finish(None, None, None)
    elif observed.observer.telemetry is None:
        # Detection only needs the pod: no status code.
        observed.finish(headers(call), call.trailing_metadata, None)
    else:
        observed.finish(headers(call), call.trailing_metadata(), _code(call))


def as_call(error: BaseException) -> Any:
    """The call an error raised by a call stands for: a failed call's RpcError is its
    ``grpc.Call``; anything else (e.g. a request that did not serialize) is None for
    :func:`finish_call`."""
    return error if isinstance(error, grpc.Call) else None


class ObservedStream(ResponseStream):
    """A response stream that tells the observer its pod at the first message and its end.

    The end is seen in the caller's thread (``StopIteration`` or the error) so telemetry is done
    before an outer interceptor ends its span; a done-callback covers streams that are cancelled
    or dropped before the end. Whichever comes first finishes the call, once.
    """

    def __init__(self, call: Any, observed: ObservedCall) -> None:
        self._call = call
        self._observed = observed
        self._first = True
        self._finished = False
        self._lock = threading.Lock()
        call.add_done_callback(self._done)

    def _claim(self) -> bool:
        """Whether this caller is the one to finish the call (the lock is never held while
        reading the call, so grpc's thread never waits behind a caller that waits on it)."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            return True

    def _done(self, _call: Any) -> None:
        # On grpc's channel thread: read what the call has, never wait (see headers_now).
        if self._claim():
            call = self._call
            self._observed.finish(headers_now(call), call.trailing_metadata(), _code(call))

    def __next__(self) -> Any:
        try:
            response = next(self._call)
        except (StopIteration, grpc.RpcError):
            if self._claim():  # the caller's thread: waiting for the headers is safe here
                call = self._call
                self._observed.finish(final_headers(call), call.trailing_metadata(), _code(call))
            raise
        if self._first:
            self._first = False
            self._observed.saw_initial_metadata(self._call.initial_metadata())
        return response
