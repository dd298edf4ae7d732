"""The call signatures of ``grpc.aio``'s multicallables, for the package's own to share.

grpc.aio's unary-request methods take the request and keyword-only options; its stream-request
methods take no request iterator (the call is then written to with ``call.write()``) and a
positional ``timeout``. A method here that differs breaks callers written for grpc.aio, so the
options go on as given, for the inner grpc.aio multicallable to take or refuse.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StreamRequestMethod", "UnaryRequestMethod"]


class _Method:
    def _call(self, request: Any, *args: Any, **options: Any) -> Any:
        """Make the call with the arguments as given (``timeout``, ``metadata``,
        ``credentials``, ``wait_for_ready``, ``compression``): the inner multicallable is
        grpc.aio's, which checks them as it always does."""
        raise NotImplementedError


class UnaryRequestMethod(_Method):
    """``grpc.aio.UnaryUnaryMultiCallable`` / ``UnaryStreamMultiCallable``'s ``__call__``: the
    request, then keyword-only options."""

    def __call__(self, request: Any, **options: Any) -> Any:
        return self._call(request, **options)


class StreamRequestMethod(_Method):
    """``grpc.aio.StreamUnaryMultiCallable`` / ``StreamStreamMultiCallable``'s ``__call__``:
    no request iterator needed (the call is then written to), options positional too."""

    def __call__(self, request_iterator: Any = None, *args: Any, **options: Any) -> Any:
        return self._call(request_iterator, *args, **options)
