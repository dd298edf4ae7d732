"""The way in (``grpc.aio``): ``observe(channel)`` sees which pod served each call.

It feeds the same :class:`CallObserver` as the sync channel wrapper. Each call is the inner
channel's own call object, returned as it is; the wrapper only adds a done-callback that reads
the call's final metadata and status off its finished state, on the event loop, without a task
or an await. grpc.aio's interceptor machinery, by contrast, wraps every call in an intercepted
call and a task of its own.

A channel made with interceptors (opentelemetry-instrumentation-grpc's aio instrumentor adds
its own) is observed by interceptors appended after them instead, so their span is current while
the pod is read and gets enriched rather than a second span made.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import grpc

from grpc_balance_mw._routing import MethodSpec, channel_method
from grpc_balance_mw.affinity.observer import UNAVAILABLE, CallObserver
from grpc_balance_mw.aio._grpcio import (
    append_interceptors,
    has_interceptors,
    when_done,
)
from grpc_balance_mw.aio.call_end import read_end, when_ended
from grpc_balance_mw.aio.interceptors import AffinityInterceptors
from grpc_balance_mw.aio.multicallables import StreamRequestMethod, UnaryRequestMethod
from grpc_balance_mw.aio.rebalance import Rebalancer
from grpc_balance_mw.call_kinds import AIO_MULTICALLABLES, by_request, kind_classes
from grpc_balance_mw.observing import ObservedMethod, ObserveOptions, Observes, observe_parts
from grpc_balance_mw.rebalancing import Rebalance

__all__ = ["ObservedChannel", "observe"]


class _Observed(ObservedMethod):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: The done-callback of a detection-only unary call: bound once, not per call.
        self._counted_unary = partial(read_end, self._count_unary)

    def _call(self, request: Any, *args: Any, **options: Any) -> Any:
        observer = self._observer
        if observer.telemetry is None:
            # A unary call's duration weighs nothing: no clock to read, no partial to build.
            # A call that fails before it starts runs no done-callback until its channel
            # closes and cancels it; it then counts as any cancelled call without headers.
            started = observer.clock() if self._stream else None
            call = self._inner(request, *args, **options)
            when_done(
                call,
                self._counted_unary
                if started is None
                else partial(read_end, partial(self._count, started)),
            )
            return call
        observed = observer.begin(self._method, self._kind)
        try:
            call = self._inner(request, *args, **options)
        except BaseException:  # e.g. a bad argument: end what begin() started, re-raise as is
            observed.finish(None, None, None)
            raise
        when_ended(call, observed.finish)
        return call

    def _count_unary(self, initial: Any, trailing: Any, code: int | None) -> None:
        self._observer.count_unary(initial, trailing)
        if code == UNAVAILABLE:
            self._observer.unavailable(initial, trailing)

    def _count(self, started: float, initial: Any, trailing: Any, code: int | None) -> None:
        self._observer.count(started, self._stream, initial, trailing)
        if code == UNAVAILABLE:
            self._observer.unavailable(initial, trailing)


class _UnaryRequest(_Observed, UnaryRequestMethod):
    # The hot path: called straight, without UnaryRequestMethod's forwarding frame; a
    # positional option fails in grpc.aio's own multicallable, as on a bare channel.
    __call__ = _Observed._call


class _StreamRequest(_Observed, StreamRequestMethod):
    pass


_KINDS = kind_classes(by_request(_UnaryRequest, _StreamRequest), AIO_MULTICALLABLES)


class ObservedChannel(Observes, grpc.aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio`` channel that observes every call it makes through another one.

    Args:
        channel: the ``grpc.aio.Channel`` that makes the calls; closed with this one.
        observer: what the calls are reported to.
        intercepted: the calls are already observed by interceptors on ``channel`` (see
            :func:`append_interceptors`): pass calls through untouched.
        rebalancer: moves later calls onto lanes when it opens them (see :func:`observe`).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        observer: CallObserver,
        *,
        intercepted: bool = False,
        rebalancer: Rebalancer | None = None,
    ) -> None:
        self._channel = channel
        self.observer = observer
        self._intercepted = intercepted
        self.rebalancer = rebalancer

    def __repr__(self) -> str:
        return f"<aio.ObservedChannel {self.observer!r}>"

    def _method(self, spec: MethodSpec) -> Any:
        inner = spec.make(self._channel)
        if not self._intercepted:
            inner = _KINDS[spec.kind](inner, self.observer, spec.method, spec.kind)
        if self.rebalancer is None:
            return inner
        return self.rebalancer.rerouted(inner, spec)

    unary_unary = channel_method("unary_unary")
    unary_stream = channel_method("unary_stream")
    stream_unary = channel_method("stream_unary")
    stream_stream = channel_method("stream_stream")

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        """Close the inner channel (and the lanes, if calls moved onto them), and stop the probe
        made for this channel (``probe=True``)."""
        if self.rebalancer is not None:
            await self.rebalancer.close(grace)
        self.observer.close()
        await self._channel.close(grace)

    async def __aenter__(self) -> ObservedChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


def observe(
    channel: grpc.aio.Channel,
    options: ObserveOptions | None = None,
    *,
    target: str | None = None,
    rebalance: Rebalance | None = None,
) -> ObservedChannel:
    """``channel``, observed: every call feeds its target's affinity detector; ``grpc.aio``.

    The same as the sync ``grpc_balance_mw.observe``. A channel made with interceptors
    (opentelemetry-instrumentation-grpc's aio instrumentor adds its own) gets this package's
    per-kind interceptors appended after them, so their span is current when the pod is read and
    is enriched rather than a second span made; a channel without any is observed by done-callbacks
    alone, the cheaper way.

    ``rebalance=Rebalance(factory)`` moves later calls onto an aio balanced channel's lanes once
    the detector says the channel is pinned or skewed, or always, as in sync; here the factory
    makes ``grpc.aio`` channels, ``factory(extra_options, interceptors)`` (e.g.
    :func:`grpc_balance_mw.aio.channel_factory`).

    Raises:
        ConfigurationError: the target could not be learned from ``channel`` and was not given;
            the rebalance factory is a sync one.
    """
    target, observer, rebalancer = observe_parts(channel, options, target, rebalance, Rebalancer)
    if has_interceptors(channel):
        interceptors = AffinityInterceptors(target, observer=observer).interceptors
        if append_interceptors(channel, interceptors):
            return ObservedChannel(channel, observer, intercepted=True, rebalancer=rebalancer)
    return ObservedChannel(channel, observer, rebalancer=rebalancer)
