"""The interceptor form (sync), for those who compose interceptors with ``grpc.intercept_channel``.

Usage::

    channel = grpc.intercept_channel(
        grpc.insecure_channel("charge-points.ev.svc:50051"),
        *affinity_interceptors("charge-points.ev.svc:50051", ObserveOptions(expected_pods=3)),
    )

The interceptor changes nothing about a call: it reads the response metadata after the fact (a
done-callback for unary responses, the first message and the end of the stream for streams) and
never waits for anything the caller is not already waiting for. With
opentelemetry-instrumentation-grpc's interceptor, put this one after it (inside) so its span is
enriched rather than a second one made.

grpcio's interceptor machinery itself costs about 1.5 us of CPU per call and 3.5-4 % of a warm
unary call's median on loopback; ``observe(channel)``
(:mod:`grpc_balance_mw.observed_channel`) observes the same way without it, and learns the target
from the channel: prefer it unless you compose interceptors.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import grpc

from grpc_balance_mw._grpcio import interceptor_channel as channel_of
from grpc_balance_mw.observed_calls import ObservedStream, as_call, finish_call, metadata_now
from grpc_balance_mw.observing import ObserveOptions, ObservingInterceptor, build_observer

__all__ = ["AffinityInterceptor", "affinity_interceptors"]


def _count_unary_done(observer: Any, call: Any) -> None:
    """:func:`_count_done` of a unary-unary call on the observer's own lane."""
    headers, trailers = metadata_now(call)
    observer.count_unary(headers, trailers)


def _count_done(observer: Any, started: float | None, stream: bool, lane: Any, call: Any) -> None:
    """Count a finished unary-response call, detection only; safe as a done-callback (nothing
    is read by waiting, see :func:`headers_now`)."""
    headers, trailers = metadata_now(call)
    observer.count(started, stream, headers, trailers, lane=lane)


def _count_failed(
    observer: Any, started: float | None, stream: bool, lane: Any, error: BaseException
) -> None:
    """Count a call whose continuation raised: its metadata if the error is the call."""
    failed = as_call(error)
    if failed is None:
        observer.count(started, stream, None, None, lane=lane)
    else:
        _count_done(observer, started, stream, lane, failed)
        if failed.code() is grpc.StatusCode.UNAVAILABLE:
            observer.unavailable(*metadata_now(failed), lane=lane)


class AffinityInterceptor(
    ObservingInterceptor,
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """One interceptor for all four call kinds of a sync channel; see :func:`affinity_interceptors`.

    One interceptor may be installed on several channels (``grpc.intercept_channel(a, i)`` and
    ``grpc.intercept_channel(b, i)``): they share its detector (as any channels to one target
    do, through the registry) and its telemetry, but each channel is its own lane, because a
    lane is the evidence of one connection. Calls of several channels counted as one lane
    would switch pods whenever they interleave, and three channels each pinned to its own pod
    would read as per-request balancing (``l7_balanced``); counted per channel they read as
    three connections spread over the pods, which is what they are. Channels made with the
    same target and options may still share one connection in gRPC core (its global subchannel
    pool), which no client-side object shows: pass ``("grpc.use_local_subchannel_pool", 1)``
    to give each its own. The channel is found through grpcio's interceptor internals (see
    :func:`channel_of`); where they are laid out otherwise, every channel shares one lane.

    Args:
        target: the channel's target string (an interceptor cannot ask the channel for it); the
            detector is per target, the probe dials it.
        options: what to observe with; a probe made for it (``probe=True``) is stopped by
            :meth:`close`.
    """

    def __init__(self, target: str, options: ObserveOptions | None = None) -> None:
        self.observer = build_observer(target, options)
        #: The done-callback of a detection-only unary-unary call on the observer's own lane
        #: (the first channel's): bound once, not per call.
        self._count_unary_done = partial(_count_unary_done, self.observer)

    def __repr__(self) -> str:
        return f"<AffinityInterceptor {self.observer!r}>"

    def _unary_response(self, continuation: Any, details: Any, request: Any, kind: str) -> Any:
        observer = self.observer
        if observer.telemetry is None:  # detection only: no ObservedCall, no status code
            lane = observer.lane_of(channel_of(continuation))
            stream = kind != "unary_unary"
            # A unary call's duration weighs nothing: no clock to read first.
            started = observer.clock() if stream else None
            try:
                outcome = continuation(details, request)
            except BaseException as error:  # count it as a failed call would be, re-raise
                _count_failed(observer, started, stream, lane, error)
                raise
            # A unary-unary call on the first channel's lane is counted as observe() counts it.
            outcome.add_done_callback(
                self._count_unary_done
                if started is None and lane is observer.lane_evidence
                else partial(_count_done, observer, started, stream, lane)
            )
            return outcome
        observed = observer.begin(details.method, kind, channel_of(continuation))
        try:
            outcome = continuation(details, request)
        except BaseException as error:  # e.g. the request did not serialize: end what begin()
            finish_call(observed, as_call(error))  # started (its span), then re-raise as is
            raise
        outcome.add_done_callback(partial(finish_call, observed))
        return outcome

    def _stream_response(self, continuation: Any, details: Any, request: Any, kind: str) -> Any:
        observed = self.observer.begin(details.method, kind, channel_of(continuation))
        try:
            call = continuation(details, request)
        except BaseException as error:  # as above
            finish_call(observed, as_call(error))
            raise
        return ObservedStream(call, observed)

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._unary_response(continuation, client_call_details, request, "unary_unary")

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return self._stream_response(continuation, client_call_details, request, "unary_stream")

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._unary_response(
            continuation, client_call_details, request_iterator, "stream_unary"
        )

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return self._stream_response(
            continuation, client_call_details, request_iterator, "stream_stream"
        )


def affinity_interceptors(
    target: str, options: ObserveOptions | None = None
) -> list[AffinityInterceptor]:
    """The interceptors to pass to ``grpc.intercept_channel(channel, *...)``: one for a sync
    channel (``grpc_balance_mw.aio.affinity_interceptors`` gives the four aio needs)."""
    return [AffinityInterceptor(target, options)]
