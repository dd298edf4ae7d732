"""The call signatures of ``grpc.aio``'s multicallables, for the package's own to share.

grpc.aio's unary-request methods take the request and keyword-only options; its stream-request
methods take no request iterator (the call is then written to with ``call.write()``) and a
positional ``timeout``. A method here that differs breaks callers written for grpc.aio.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StreamRequestMethod", "UnaryRequestMethod"]


class _Method:
    def _call(self, request: Any, **options: Any) -> Any:
        """Make the call: ``options`` are ``timeout``, ``metadata``, ``credentials``,
        ``wait_for_ready`` and ``compression``, as given."""
        raise NotImplementedError


class UnaryRequestMethod(_Method):
    """``grpc.aio.UnaryUnaryMultiCallable`` / ``UnaryStreamMultiCallable``'s ``__call__``."""

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


class StreamRequestMethod(_Method):
    """``grpc.aio.StreamUnaryMultiCallable`` / ``StreamStreamMultiCallable``'s ``__call__``."""

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
