"""Working with opentelemetry-instrumentation-grpc: one span per call, carrying the pod.

When that instrumentation's client interceptor runs outside ours, its span is current while our
code runs, and :mod:`grpc_balance_mw.telemetry` enriches it instead of starting a second span.
``GrpcInstrumentorClient`` wraps every channel when it is made, which would put it inside
anything the user adds; :class:`~grpc_balance_mw.observed_methods.ObservedChannel` undoes that
order with :func:`instrumentation_parts` and :class:`ObservedCore`. Nothing here imports the
instrumentation: it is found in ``sys.modules`` if the application loaded it.
"""

from __future__ import annotations

from typing import Any

import grpc

from grpc_balance_mw._grpcio import (
    INSTRUMENTATION_MODULE,
    instrumentation_parts,
    instrumentor_active,
)

__all__ = [
    "INSTRUMENTATION_MODULE",
    "ObservedCore",
    "instrumentation_parts",
    "instrumentor_active",
]


class ObservedCore(grpc.Channel):  # type: ignore[misc]
    """The observing part of an :class:`ObservedChannel`, for an interceptor to sit outside."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def _make(self, kind: str, method: str, *args: Any, **kwargs: Any) -> Any:
        serializer = args[0] if args else kwargs.get("request_serializer")
        deserializer = args[1] if len(args) > 1 else kwargs.get("response_deserializer")
        registered = args[2] if len(args) > 2 else kwargs.get("_registered_method", False)
        return self._owner._observed_core(kind, method, serializer, deserializer, registered)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._make("unary_unary", method, *args, **kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._make("unary_stream", method, *args, **kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._make("stream_unary", method, *args, **kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._make("stream_stream", method, *args, **kwargs)

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        self._owner.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Any) -> None:
        self._owner.unsubscribe(callback)

    def close(self) -> None:
        self._owner.close()
