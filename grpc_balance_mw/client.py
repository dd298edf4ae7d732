"""Observing client interceptors, sync (``grpc.intercept_channel``): see which pod served each call.

Usage::

    channel = grpc.intercept_channel(
        grpc.insecure_channel("charge-points.ev.svc:50051"),
        AffinityInterceptor("charge-points.ev.svc:50051", expected_pods=3),
    )
    ...
    AffinityInterceptor.detector.snapshot()

The interceptor changes nothing about a call: it reads the response metadata after the fact (a
done-callback for unary responses, the first message and the end of the stream for streams) and
never waits for anything the caller is not already waiting for. With
opentelemetry-instrumentation-grpc's interceptor, put this one after it (inside) so its span is
enriched rather than a second one made.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallObserver, CallTelemetry, ObservedCall
from grpc_balance_mw.affinity.registry import AffinityRegistry, default_registry
from grpc_balance_mw.probe import PodProbe

__all__ = ["AffinityInterceptor", "affinity_interceptors", "build_observer"]

_lanes = itertools.count()


def build_observer(
    target: str,
    *,
    config: AffinityConfig | None,
    expected_pods: int | None,
    telemetry: CallTelemetry | None,
    probe: PodProbe | bool,
    registry: AffinityRegistry | None,
    lane: str | None,
) -> CallObserver:
    """The shared core behind one set of interceptors (sync or aio)."""
    detector = (registry if registry is not None else default_registry).detector(target, config)
    if expected_pods is not None:
        detector.expected_pods = expected_pods
    pod_probe = PodProbe(target, detector) if probe is True else probe or None
    return CallObserver(
        detector,
        telemetry=telemetry,
        probe=pod_probe,
        lane=lane if lane is not None else f"lane-{next(_lanes)}",
    )


def _code(call: Any) -> int | None:
    code = call.code()
    return code.value[0] if code is not None else None


def _finish_unary(observed: ObservedCall) -> Callable[[Any], None]:
    if observed.observer.telemetry is None:
        # Detection only needs the pod: trailers are read only if the headers named none.
        def detect(call: Any) -> None:
            observed.finish(call.initial_metadata(), call.trailing_metadata, None)

        return detect

    def done(call: Any) -> None:
        observed.finish(call.initial_metadata(), call.trailing_metadata(), _code(call))

    return done


class _ObservedStream(grpc.Call, grpc.Future):  # type: ignore[misc]
    """A response stream that tells the observer its pod at the first message and its end.

    The end is seen in the caller's thread (``StopIteration`` or the error) so telemetry is done
    before an outer interceptor ends its span; a done-callback covers streams that are cancelled
    or dropped before the end. Whichever comes first finishes the call, once.
    """

    def __init__(self, call: Any, observed: ObservedCall) -> None:
        self._call = call
        self._observed = observed
        self._first = True
        self._finished = False
        self._lock = threading.Lock()
        call.add_done_callback(self._done)

    def _finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
            call = self._call
            self._observed.finish(call.initial_metadata(), call.trailing_metadata(), _code(call))

    def _done(self, _call: Any) -> None:
        self._finish()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            response = next(self._call)
        except (StopIteration, grpc.RpcError):
            self._finish()
            raise
        if self._first:
            self._first = False
            self._observed.saw_initial_metadata(self._call.initial_metadata())
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> Any:
        return self._call.code()

    def details(self) -> Any:
        return self._call.details()

    def is_active(self) -> Any:
        return self._call.is_active()

    def time_remaining(self) -> Any:
        return self._call.time_remaining()

    def cancel(self) -> Any:
        return self._call.cancel()

    def add_callback(self, callback: Any) -> Any:
        return self._call.add_callback(callback)

    def cancelled(self) -> Any:
        return self._call.cancelled()

    def running(self) -> Any:
        return self._call.running()

    def done(self) -> Any:
        return self._call.done()

    def result(self, timeout: float | None = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: float | None = None) -> Any:
        return self._call.exception(timeout)

    def traceback(self, timeout: float | None = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Any) -> None:
        self._call.add_done_callback(lambda _call: fn(self))


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
        probe: True for a :class:`PodProbe` with defaults, or a configured one.
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

    def _unary_response(self, continuation: Any, details: Any, request: Any, kind: str) -> Any:
        observed = self.observer.begin(details.method, kind)
        outcome = continuation(details, request)
        outcome.add_done_callback(_finish_unary(observed))
        return outcome

    def _stream_response(self, continuation: Any, details: Any, request: Any, kind: str) -> Any:
        observed = self.observer.begin(details.method, kind)
        return _ObservedStream(continuation(details, request), observed)

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
