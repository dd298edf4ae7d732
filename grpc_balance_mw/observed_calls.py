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

from grpc_balance_mw._grpcio import (
    final_headers,
    final_metadata,
    final_trailers,
    headers_now,
    metadata_now,
)
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
