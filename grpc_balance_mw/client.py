"""Observing client interceptors, sync (``grpc.intercept_channel``): see which pod served each call.

Usage::

    interceptor = AffinityInterceptor("charge-points.ev.svc:50051", expected_pods=3)
    channel = grpc.intercept_channel(
        grpc.insecure_channel("charge-points.ev.svc:50051"), interceptor
    )
    ...
    interceptor.detector.snapshot()

The interceptor changes nothing about a call: it reads the response metadata after the fact (a
done-callback for unary responses, the first message and the end of the stream for streams) and
never waits for anything the caller is not already waiting for. With
opentelemetry-instrumentation-grpc's interceptor, put this one after it (inside) so its span is
enriched rather than a second one made.

grpcio's interceptor machinery itself costs about 8 % of a warm unary call; :func:`observe_channel`
(re-exported here) observes the same way as a channel wrapper, without that machinery.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import grpc

from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallTelemetry
from grpc_balance_mw.affinity.registry import AffinityRegistry
from grpc_balance_mw.observed_channel import (
    ObservedChannel,
    ObservedStream,
    as_call,
    build_observer,
    finish_call,
    observe_channel,
)
from grpc_balance_mw.probe import PodProbe

__all__ = [
    "AffinityInterceptor",
    "ObservedChannel",
    "affinity_interceptors",
    "build_observer",
    "observe_channel",
]


class AffinityInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Observes all four call kinds on a sync channel and feeds the target's affinity detector.

    Args:
        target: the channel's target string (an interceptor cannot ask the channel for it); the
            detector is per target, the probe dials it.
        config: thresholds and windows; the first config given for a target wins.
        expected_pods: how many pods the target should have, if known.
        telemetry: an ``AffinityTelemetry`` for spans, metrics and alarms; None: detection only.
        probe: True for a :class:`PodProbe` with defaults (stopped by :meth:`close`), or a
            configured one, which is yours to ``stop()``.
        registry: where the target's detector lives; default the process-wide registry.
        lane: the connection's name in telemetry; default ``lane-N``.
    """

    def __init__(
        self,
        target: str,
        *,
        config: AffinityConfig | None = None,
        expected_pods: int | None = None,
        telemetry: CallTelemetry | None = None,
        probe: PodProbe | bool = False,
        registry: AffinityRegistry | None = None,
        lane: str | None = None,
    ) -> None:
        self.observer = build_observer(
            target,
            config=config,
            expected_pods=expected_pods,
            telemetry=telemetry,
            probe=probe,
            registry=registry,
            lane=lane,
        )

    def __repr__(self) -> str:
        return f"<AffinityInterceptor {self.observer!r}>"

    @property
    def detector(self) -> AffinityDetector:
        return self.observer.detector

    def close(self) -> None:
        """Stop the probe made for this interceptor (``probe=True``); closing the channel does
        not reach an interceptor, so call this when the channel is closed."""
        self.observer.close()

    def _unary_response(self, continuation: Any, details: Any, request: Any, kind: str) -> Any:
        observed = self.observer.begin(details.method, kind)
        try:
            outcome = continuation(details, request)
        except BaseException as error:  # e.g. the request did not serialize: end what begin()
            finish_call(observed, as_call(error))  # started (its span), then re-raise as is
            raise
        outcome.add_done_callback(partial(finish_call, observed))
        return outcome

    def _stream_response(self, continuation: Any, details: Any, request: Any, kind: str) -> Any:
        observed = self.observer.begin(details.method, kind)
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


def affinity_interceptors(target: str, **kwargs: Any) -> list[AffinityInterceptor]:
    """The interceptors to pass to ``grpc.intercept_channel(channel, *...)``; see the class."""
    return [AffinityInterceptor(target, **kwargs)]
