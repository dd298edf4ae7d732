"""What the sync and aio server middleware share: handler rebuilding and status merging."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from grpc_balance_mw.identity import PodIdentity, merge_identity

#: Wraps a handler's behavior so that what it sends carries the stamp.
Wrap = Callable[[Callable[..., Any], tuple[tuple[str, str], ...]], Callable[..., Any]]

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


class StampingContext:
    """What the sync and aio stamping servicer contexts share: the identity goes out in the
    trailing metadata, set up front so that every status (aborts and exceptions included)
    carries it, and in the initial metadata once, as late as possible (the handler's own
    ``send_initial_metadata``, the first streamed message, or the handler's end), so that a
    handler that sends its own initial metadata still can. Anything else is the context's."""

    def __init__(self, context: Any, stamp: tuple[tuple[str, str], ...]) -> None:
        self._context = context
        self._stamp = stamp
        self._initial_sent = False
        context.set_trailing_metadata(stamp)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(merge_identity(trailing_metadata, self._stamp))

    def _flush_due(self) -> bool:
        """Whether the identity has still to go out as initial metadata (True once: nothing
        else went out before)."""
        due = not self._initial_sent
        self._initial_sent = True
        return due


class IdentityStamper:
    """What the sync and aio ``PodIdentityInterceptor`` share: the identity, and each method
    handler rebuilt with its behavior stamped (``_wrap(unary_response, stream_response)``)."""

    _wraps: tuple[Wrap, Wrap]

    def __init__(self, identity: PodIdentity | None = None) -> None:
        self.identity = identity if identity is not None else PodIdentity.from_env()
        self._stamp = self.identity.to_metadata()

    def _stamped(self, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        kind = handler_kind(handler)
        wrap = self._wraps[1 if handler.response_streaming else 0]
        return rebuild_handler(handler, kind, wrap(getattr(handler, kind), self._stamp))
