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
A unary call is handed back at once and read by its done-callback when it ends, before an outer
interceptor resumes; streams are observed by a task of their own, which learns the pod from the
headers while the stream runs. The caller never waits for either.
``grpc_balance_mw.aio.observe(channel)`` observes without interceptors, for less: prefer it unless
you compose interceptors.
"""

from __future__ import annotations

import asyncio
from functools import partial, partialmethod
from typing import Any

import grpc

from grpc_balance_mw.affinity.observer import CallObserver, ObservedCall
from grpc_balance_mw.aio._grpcio import append_interceptors, has_interceptors
from grpc_balance_mw.aio._grpcio import interceptor_channel as channel_of
from grpc_balance_mw.aio.call_end import settle_followers, when_ended
from grpc_balance_mw.call_kinds import kind_classes
from grpc_balance_mw.observing import ObserveOptions, ObservingInterceptor, build_observer

__all__ = [
    "AffinityInterceptors",
    "affinity_interceptors",
    "append_interceptors",
    "has_interceptors",
]


async def _see_headers(call: Any, observed: ObservedCall) -> None:
    """Learn a stream's pod from its headers, while it runs (its end is read when it ends)."""
    observed.saw_initial_metadata(await call.initial_metadata())


def _stream_ended(
    headers: asyncio.Task[None],
    observed: ObservedCall,
    initial: Any,
    trailing: Any,
    code: int | None,
) -> None:
    headers.cancel()  # the call has ended: its headers are in ``initial``, or never came
    observed.finish(initial, trailing, code)


#: grpc.aio's client interceptor type of each call kind, in call-kind order.
_INTERCEPTOR_TYPES: dict[str, type] = {
    "unary_unary": grpc.aio.UnaryUnaryClientInterceptor,
    "unary_stream": grpc.aio.UnaryStreamClientInterceptor,
    "stream_unary": grpc.aio.StreamUnaryClientInterceptor,
    "stream_stream": grpc.aio.StreamStreamClientInterceptor,
}


class _KindInterceptor:
    """The interceptor of one call kind (its class's grpc.aio type says which)."""

    def __init__(self, owner: AffinityInterceptors) -> None:
        self._owner = owner
        self._observer = owner.observer

    async def _intercept(
        self, kind: str, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        observed = self._observer.begin(client_call_details.method, kind, channel_of(continuation))
        call = await continuation(client_call_details, request)
        if kind == "unary_unary":
            # Returned at once, read when it ends (see call_end): awaiting it here would hang
            # on a call that fails before it starts, and take the RPC down with a cancelled
            # caller.
            when_ended(call, observed.finish)
        else:
            # Not awaited here: a caller that writes with call.write() needs the call back.
            self._owner.follow(call, observed)
        return call

    intercept_unary_unary = partialmethod(_intercept, "unary_unary")
    intercept_unary_stream = partialmethod(_intercept, "unary_stream")
    intercept_stream_unary = partialmethod(_intercept, "stream_unary")
    intercept_stream_stream = partialmethod(_intercept, "stream_stream")


_KINDS = kind_classes(dict.fromkeys(_INTERCEPTOR_TYPES, _KindInterceptor), _INTERCEPTOR_TYPES)


class AffinityInterceptors(ObservingInterceptor):
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
            interceptor(self) for interceptor in _KINDS.values()
        ]

    def __repr__(self) -> str:
        return f"<aio.AffinityInterceptors {self.observer!r}, {len(self._tasks)} streams followed>"

    def follow(self, call: Any, observed: ObservedCall) -> None:
        """Observe a stream: its headers in a task of its own (kept referenced until the call
        ends), its end from its done-callback."""
        task = asyncio.get_running_loop().create_task(_see_headers(call, observed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        when_ended(call, partial(_stream_ended, task, observed))

    async def settle(self) -> None:
        """Wait until every followed call has been observed to its end (for tests, shutdown);
        a unary call is observed by the time awaiting it returns."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            # Since Python 3.12 gathering tasks that are all done returns without a pass of the
            # event loop, so the done-callbacks that take them out of the set have not run yet.
            self._tasks.difference_update([task for task in self._tasks if task.done()])
        await settle_followers()


def affinity_interceptors(
    target: str, options: ObserveOptions | None = None
) -> list[grpc.aio.ClientInterceptor]:
    """The interceptors to pass as ``grpc.aio.*_channel(..., interceptors=...)``: four, one per
    call kind (``grpc_balance_mw.affinity_interceptors`` gives the one a sync channel needs)."""
    return AffinityInterceptors(target, options).interceptors
