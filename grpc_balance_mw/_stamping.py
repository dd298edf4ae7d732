"""What the sync and aio server middleware share: handler rebuilding, status merging, and the
load report that goes in every call's trailer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from grpc_balance_mw.identity import PodIdentity, merge_identity
from grpc_balance_mw.load_meter import LoadMeter
from grpc_balance_mw.orca import GRPCIO_TRAILER_KEY, TRAILER_KEY

_log = logging.getLogger(__name__)

Stamp = tuple[tuple[str, str | bytes], ...]

#: The trailers the load report goes in: the standard one, and the one grpcio clients can read
#: (see :data:`~grpc_balance_mw.orca.GRPCIO_TRAILER_KEY`).
REPORT_KEYS = (TRAILER_KEY, GRPCIO_TRAILER_KEY)

#: Health checks are not load: they are not counted in a report (a ``Watch`` would stay in
#: flight for the life of its lane), though their connections are, and they carry one.
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class CallStamp:
    """What one call's responses carry: the identity pairs, and a load report from ``meter``
    (None: no report) that counts the call unless ``counted`` is False."""

    pairs: Stamp
    meter: LoadMeter | None = None
    counted: bool = True


#: Wraps a handler's behavior so that what it sends carries the stamp.
Wrap = Callable[[Callable[..., Any], CallStamp], Callable[..., Any]]

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
    def of(cls, status: grpc.Status, stamp: Stamp) -> StampedStatus:
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
    handler that sends its own initial metadata still can. Anything else is the context's.

    With a load meter, the call is counted from here to :meth:`end` (the handler's end, or its
    abort), which adds the load report to the trailing metadata, merged with the handler's own.
    """

    def __init__(self, context: Any, stamp: CallStamp) -> None:
        self._context = context
        self._stamp = stamp.pairs
        self._initial_sent = False
        self._trailing: Any = ()
        self._failed = False
        self._meter = stamp.meter
        self._counted = stamp.counted
        context.set_trailing_metadata(self._stamp)
        if self._meter is not None:
            self._start(self._meter, context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._trailing = trailing_metadata
        self._context.set_trailing_metadata(merge_identity(trailing_metadata, self._stamp))

    def set_code(self, code: grpc.StatusCode) -> None:
        self._failed = code is not grpc.StatusCode.OK
        self._context.set_code(code)

    def _start(self, meter: LoadMeter, context: Any) -> None:
        try:
            peer = context.peer()
            if self._counted:
                meter.start(peer)
            else:
                meter.touch(peer)
        except Exception:  # telemetry: never fail the call
            _log.exception("the load meter failed at a call's start")
            self._meter = None

    def end(self, failed: bool) -> Stamp:
        """The call is over (``failed``: it raised or aborted): once, count it and put the
        load report in the trailing metadata. Returns what the trailers carry."""
        meter, self._meter = self._meter, None
        if meter is None:
            return self._stamp
        try:
            if self._counted:
                encoded = meter.end_encoded(failed or self._failed)
            else:
                encoded = meter.report_encoded()
            self._stamp = (*self._stamp, *((key, encoded) for key in REPORT_KEYS))
        except Exception:  # telemetry: never fail the call
            _log.exception("the load meter failed at a call's end; the call has no report")
            return self._stamp
        self._context.set_trailing_metadata(merge_identity(self._trailing, self._stamp))
        return self._stamp

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

    def __init__(
        self, identity: PodIdentity | None = None, *, load_meter: LoadMeter | None = None
    ) -> None:
        self.identity = identity if identity is not None else PodIdentity.from_env()
        self.load_meter = load_meter
        self._stamp: Stamp = self.identity.to_metadata()

    def _stamped(
        self, handler: grpc.RpcMethodHandler | None, method: str | bytes | None = None
    ) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        kind = handler_kind(handler)
        wrap = self._wraps[1 if handler.response_streaming else 0]
        stamp = CallStamp(self._stamp, self.load_meter, counted=not _is_health(method))
        return rebuild_handler(handler, kind, wrap(getattr(handler, kind), stamp))


def _is_health(method: str | bytes | None) -> bool:
    if isinstance(method, bytes):
        return method.startswith(_HEALTH_PREFIX.encode())
    return method is not None and method.startswith(_HEALTH_PREFIX)
