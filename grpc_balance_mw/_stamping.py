"""What the sync and aio server middleware share: handler rebuilding and status merging."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from grpc_balance_mw.identity import merge_identity

_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    """The call kind of a method handler, e.g. ``"unary_stream"``."""
    request = "stream" if handler.request_streaming else "unary"
    response = "stream" if handler.response_streaming else "unary"
    return f"{request}_{response}"


def rebuild_handler(
    handler: grpc.RpcMethodHandler, kind: str, behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """A handler like ``handler`` whose behavior is ``behavior``."""
    return _FACTORIES[kind](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class StampedStatus(grpc.Status):  # type: ignore[misc]
    """A ``grpc.Status`` whose trailing metadata carries the pod identity."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: Any

    @classmethod
    def of(cls, status: grpc.Status, stamp: tuple[tuple[str, str], ...]) -> StampedStatus:
        return cls(
            code=status.code,
            details=status.details,
            trailing_metadata=merge_identity(getattr(status, "trailing_metadata", None), stamp),
        )
