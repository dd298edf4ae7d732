"""The four call kinds of a channel, each a multicallable class made from one table.

A channel's methods come as four multicallable types (``grpc.UnaryUnaryMultiCallable`` ...
``grpc.aio.StreamStreamMultiCallable``); a wrapper needs its own class for each, which differ
only in which of its two behaviours (by request or by response arity) they take and which
grpc base they declare. :func:`kind_classes` makes the four from that table instead of four
hand-written ``class ...: pass`` per wrapper, sync and aio alike.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import grpc

from grpc_balance_mw._routing import CALL_KINDS

__all__ = [
    "AIO_MULTICALLABLES",
    "SYNC_MULTICALLABLES",
    "by_request",
    "by_response",
    "kind_classes",
]

#: grpc's multicallable type of each call kind, sync and ``grpc.aio``.
SYNC_MULTICALLABLES: Mapping[str, type] = {
    "unary_unary": grpc.UnaryUnaryMultiCallable,
    "unary_stream": grpc.UnaryStreamMultiCallable,
    "stream_unary": grpc.StreamUnaryMultiCallable,
    "stream_stream": grpc.StreamStreamMultiCallable,
}
AIO_MULTICALLABLES: Mapping[str, type] = {
    "unary_unary": grpc.aio.UnaryUnaryMultiCallable,
    "unary_stream": grpc.aio.UnaryStreamMultiCallable,
    "stream_unary": grpc.aio.StreamUnaryMultiCallable,
    "stream_stream": grpc.aio.StreamStreamMultiCallable,
}


def by_response(unary: type, stream: type) -> dict[str, type]:
    """``unary`` for the unary-response kinds, ``stream`` for the response-stream ones."""
    return {kind: stream if kind.endswith("_stream") else unary for kind in CALL_KINDS}


def by_request(unary: type, stream: type) -> dict[str, type]:
    """``unary`` for the unary-request kinds, ``stream`` for the request-stream ones."""
    return {kind: stream if kind.startswith("stream_") else unary for kind in CALL_KINDS}


def kind_classes(behaviours: Mapping[str, type], bases: Mapping[str, type]) -> dict[str, Any]:
    """A class per call kind in ``behaviours``: its behaviour first, then grpc's base for the
    kind (``bases``: :data:`SYNC_MULTICALLABLES` or :data:`AIO_MULTICALLABLES`), so that it is
    what stubs and ``isinstance`` checks expect of that kind."""
    made: dict[str, Any] = {}
    for kind, behaviour in behaviours.items():
        name = behaviour.__name__.lstrip("_") + "".join(p.title() for p in kind.split("_"))
        cls = types.new_class(f"_{name}", (behaviour, bases[kind]))
        cls.__module__ = behaviour.__module__
        made[kind] = cls
    return made
