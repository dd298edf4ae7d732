"""The interceptor form for ``grpc.aio``, for those who compose interceptors.

Usage::

    channel = grpc.aio.insecure_channel(
        "charge-points.ev.svc:50051",
        interceptors=affinity_interceptors(
            "charge-points.ev.svc:50051", ObserveOptions(expected_pods=3)
        ),
    )

``grpc.aio`` registers an interceptor object under only the first call kind it implements, so
:class:`AffinityInterceptors` hands out four objects, one per kind, that share one observer.
Unary calls are observed inside the interceptor once they complete (as the caller awaits them
anyway); streams are observed by a task of their own, so a streaming caller never waits for it.
``grpc_balance_mw.aio.observe(channel)`` observes without interceptors, for less: prefer it unless
you compose interceptors.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallObserver, ObservedCall
from grpc_balance_mw.observing import ObserveOptions, build_observer

__all__ = ["AffinityInterceptors", "affinity_interceptors"]

_CANCELLED = grpc.StatusCode.CANCELLED.value[0]


async def _observe(call: Any, observed: ObservedCall) -> None:
    """Follow one call: its pod when the headers arrive, its status when it ends."""
    try:
        initial = await call.initial_metadata()
        observed.saw_initial_metadata(initial)
        code = await call.code()
        # Read even when the headers named a pod: trailers naming another make it malformed.
        trailing = await call.trailing_metadata()
    except asyncio.CancelledError:
        observed.finish(None, None, _CANCELLED)
        raise
    observed.finish(initial, trailing, code.value[0] if code is not None else None)


def channel_of(continuation: Any) -> object | None:
    """The core channel a ``grpc.aio`` interceptor's ``continuation`` calls into, or None.

    grpc.aio's continuation is a ``functools.partial`` of the intercepted call's
    ``_run_interceptor``; that call keeps the channel's ``cygrpc.AioChannel`` as ``_channel``.
    A grpcio laid out otherwise gives None: the interceptors' calls then share one lane.
    """
    call = getattr(getattr(continuation, "func", None), "__self__", None)
    return getattr(call, "_channel", None)


class _KindInterceptor:
    def __init__(self, owner: AffinityInterceptors) -> None:
        self._owner = owner
        self._observer = owner.observer


class _UnaryUnary(_KindInterceptor, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        observed = self._observer.begin(
            client_call_details.method, "unary_unary", channel_of(continuation)
        )
        call = await continuation(client_call_details, request)
        # The caller awaits this call's end anyway; observing it here ends the telemetry before
        # an outer interceptor (opentelemetry-instrumentation-grpc) ends its span.
        await _observe(call, observed)
        return call


class _UnaryStream(_KindInterceptor, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        observed = self._observer.begin(
            client_call_details.method, "unary_stream", channel_of(continuation)
        )
        call = await continuation(client_call_details, request)
        self._owner.follow(call, observed)
        return call


class _StreamUnary(_KindInterceptor, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        observed = self._observer.begin(
            client_call_details.method, "stream_unary", channel_of(continuation)
        )
        call = await continuation(client_call_details, request_iterator)
        # Not awaited here: a caller that writes with call.write() needs the call back first.
        self._owner.follow(call, observed)
        return call


class _StreamStream(_KindInterceptor, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        observed = self._observer.begin(
            client_call_details.method, "stream_stream", channel_of(continuation)
        )
        call = await continuation(client_call_details, request_iterator)
        self._owner.follow(call, observed)
        return call


class AffinityInterceptors:
    """The four per-kind interceptors of a ``grpc.aio`` channel, sharing one observer.

    ``grpc.aio`` registers an interceptor object under only the first call kind it implements,
    so one object cannot serve all four: pass :attr:`interceptors` (or use
    :func:`affinity_interceptors`).

    The same interceptors may be passed to several channels: they share the detector and the
    telemetry, and each channel is its own lane (the evidence of one connection), as with the
    sync ``AffinityInterceptor``, whose docstring says why. grpc.aio's core channel cannot be
    weakly referenced, so a channel's lane is kept (up to ``ChannelLanes.limit`` channels)
    after the channel is gone; a later channel at the same address continues it, as a
    reconnect.

    Args:
        target: the channel's target string; the detector is per target, the probe dials it.
        options: what to observe with; a probe made for it (``probe=True``, on a thread of its
            own, off the event loop) is stopped by :meth:`close`.
        observer: an observer built already (``observe()`` shares its own); else one is built.
    """

    def __init__(
        self,
        target: str,
        options: ObserveOptions | None = None,
        *,
        observer: CallObserver | None = None,
    ) -> None:
        self.observer: CallObserver = (
            observer if observer is not None else build_observer(target, options)
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.interceptors: list[grpc.aio.ClientInterceptor] = [
            _UnaryUnary(self),
            _UnaryStream(self),
            _StreamUnary(self),
            _StreamStream(self),
        ]

    def __repr__(self) -> str:
        return f"<aio.AffinityInterceptors {self.observer!r}, {len(self._tasks)} streams followed>"

    @property
    def detector(self) -> AffinityDetector:
        return self.observer.detector

    def close(self) -> None:
        """Stop the probe made for this interceptor (``probe=True``); closing the channel does
        not reach an interceptor, so call this when the channel is closed."""
        self.observer.close()

    def follow(self, call: Any, observed: ObservedCall) -> None:
        """Observe a stream in a task of its own (kept referenced until it ends)."""
        task = asyncio.get_running_loop().create_task(_observe(call, observed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait until every followed stream has been observed to its end (for tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def affinity_interceptors(
    target: str, options: ObserveOptions | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors to pass as ``grpc.aio.*_channel(..., interceptors=...)``: four, one per
    call kind (``grpc_balance_mw.affinity_interceptors`` gives the one a sync channel needs)."""
    return AffinityInterceptors(target, options).interceptors
