"""The part every sync response-stream wrapper shares: being grpcio's stream in all but its ends.

The observing channel, the balanced channel and the dial-per-request channel each hand callers
a wrapper of grpcio's response stream that must act on the stream's end (count it, give the lane
back, close the connection). Stubs and callers use the result as a ``grpc.Call`` and a
``grpc.Future``, so every method of both is forwarded here, once; subclasses add ``__init__``
and ``__next__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

__all__ = ["ResponseStream"]


class ResponseStream(grpc.Call, grpc.Future):  # type: ignore[misc]
    """grpcio's response stream ``_call``, forwarded; subclasses define ``__next__``."""

    _call: Any

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> Any:
        return self._call.code()

    def details(self) -> Any:
        return self._call.details()

    def is_active(self) -> Any:
        return self._call.is_active()

    def time_remaining(self) -> Any:
        return self._call.time_remaining()

    def cancel(self) -> Any:
        return self._call.cancel()

    def add_callback(self, callback: Any) -> Any:
        return self._call.add_callback(callback)

    def cancelled(self) -> Any:
        return self._call.cancelled()

    def running(self) -> Any:
        return self._call.running()

    def done(self) -> Any:
        return self._call.done()

    def result(self, timeout: float | None = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Any) -> None:
        self._call.add_done_callback(lambda _call: fn(self))
