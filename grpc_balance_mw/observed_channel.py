"""An observing ``grpc.Channel`` (sync): see which pod served each call, without an interceptor.

Usage::

    channel = observe_channel(
        grpc.insecure_channel("charge-points.ev.svc:50051"),
        "charge-points.ev.svc:50051",
        expected_pods=3,
    )
    stub = ChargePointsStub(channel)
    ...
    channel.detector.snapshot()

It feeds the same :class:`CallObserver` as :class:`~grpc_balance_mw.client.AffinityInterceptor`
but wraps the inner channel's multicallables directly: ``grpc.intercept_channel`` wraps every
call in a client-call-details object, a continuation closure and an outcome future, which alone
costs about 8 % of a warm unary call on loopback (see ``python -m
grpc_balance_mw.bench.interceptors``). Stubs and ``grpc.intercept_channel`` accept it as they
accept any channel; put opentelemetry-instrumentation-grpc's interceptor outside it so its span is
enriched rather than a second one made. Sync only: ``grpc.aio`` channels are observed through
:mod:`grpc_balance_mw.aio.client`'s interceptors.

Without telemetry, the plain ``__call__`` of unary-response methods (the common call) counts the
call straight into the observer (``CallObserver.count``) without an ``ObservedCall``.

This module also holds what the sync interceptor shares with the channel: building the observer,
finishing a unary call and the observed response stream.
"""

from __future__ import annotations

import inspect
import itertools
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import grpc

from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallObserver, CallTelemetry, ObservedCall
from grpc_balance_mw.affinity.registry import AffinityRegistry, default_registry
from grpc_balance_mw.instrumentation import ObservedCore, instrumentation_parts
from grpc_balance_mw.probe import PodProbe, resolve_in_background

__all__ = [
    "ObservedChannel",
    "ObservedStream",
    "as_call",
    "build_observer",
    "finish_call",
    "headers_now",
    "observe_channel",
]

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
    """The shared core behind one set of interceptors (sync or aio) or one observed channel."""
    detector = (registry if registry is not None else default_registry).detector(target, config)
    if expected_pods is not None:
        detector.expected_pods = expected_pods
    pod_probe = PodProbe(target, detector) if probe is True else probe or None
    resolve_in_background(detector)
    return CallObserver(
        detector,
        telemetry=telemetry,
        probe=pod_probe,
        lane=lane if lane is not None else f"lane-{next(_lanes)}",
        owns_probe=probe is True,
    )


def _code(call: Any) -> int | None:
    code = call.code()
    return code.value[0] if code is not None else None


def _initial_metadata(call: Any) -> Any:
    """``call.initial_metadata()`` of a call that has ended, read in the caller's thread.

    grpcio's public method takes the call's condition and builds a closure to wait on it, which
    is a measurable part of the 3 % budget of a warm unary call; once the call has ended (as
    after a successful ``with_call``) the metadata is final and can be read off its state. Any
    other kind of call, or a grpcio without that state, goes through the public method, which may
    wait: never call this from a done-callback (see :func:`headers_now`).
    """
    metadata = getattr(getattr(call, "_state", None), "initial_metadata", None)
    return metadata if metadata is not None else call.initial_metadata()


def headers_now(call: Any) -> Any:
    """The initial metadata a call has received so far, without waiting; None if none yet.

    For done-callbacks. grpcio runs them on the channel's own event thread, and its
    ``initial_metadata()`` waits for an event that only that thread delivers: a stream that ends
    before any response header (UNIMPLEMENTED, a killed pod, a trailers-only abort) would block
    that thread past the call's deadline and wedge every later call on the channel. A call that
    ended without headers had a trailers-only response, so the pod, if any, is in its trailers.
    The state is found on grpcio's calls, through interceptor outcomes (``_call``) and through
    :class:`ObservedStream`; any other kind of call answers None rather than risk the wait.
    """
    for _ in range(4):
        state = getattr(call, "_state", None)
        if state is not None:
            return getattr(state, "initial_metadata", None)
        call = getattr(call, "_call", None)
        if call is None:
            break
    return None


def finish_call(
    observed: ObservedCall, call: Any, *, headers: Callable[[Any], Any] = headers_now
) -> None:
    """Count a finished unary-response call; ``call`` is its ``grpc.Call``, or None if the call
    failed before it was one (e.g. the request did not serialize): no pod, no status.

    Safe as a done-callback: by default it never waits on the call (see :func:`headers_now`);
    the caller's thread may pass ``headers=_initial_metadata`` once the call has ended.
    """
    if call is None:
        observed.finish(None, None, None)
    elif observed.observer.telemetry is None:
        # Detection only needs the pod: no status code.
        observed.finish(headers(call), call.trailing_metadata, None)
    else:
        observed.finish(headers(call), call.trailing_metadata(), _code(call))


def as_call(error: BaseException) -> Any:
    """The call an error raised by a call stands for: a failed call's RpcError is its
    ``grpc.Call``; anything else (e.g. a request that did not serialize) is None for
    :func:`finish_call`."""
    return error if isinstance(error, grpc.Call) else None


class ObservedStream(grpc.Call, grpc.Future):  # type: ignore[misc]
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

    def _claim(self) -> bool:
        """Whether this caller is the one to finish the call (the lock is never held while
        reading the call, so grpc's thread never waits behind a caller that waits on it)."""
        with self._lock:
            if self._finished:
                return False
            self._finished = True
            return True

    def _done(self, _call: Any) -> None:
        # On grpc's channel thread: read what the call has, never wait (see headers_now).
        if self._claim():
            call = self._call
            self._observed.finish(headers_now(call), call.trailing_metadata(), _code(call))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            response = next(self._call)
        except (StopIteration, grpc.RpcError):
            if self._claim():  # the caller's thread: waiting for the headers is safe here
                call = self._call
                self._observed.finish(
                    _initial_metadata(call), call.trailing_metadata(), _code(call)
                )
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


class _Observed:
    """One method of the observed channel: the inner multicallable and the observer."""

    def __init__(self, inner: Any, observer: CallObserver, method: str | bytes, kind: str) -> None:
        self._inner = inner
        self._observer = observer
        self._method = method
        self._kind = kind
        self._stream = kind != "unary_unary"


class _UnaryResponse(_Observed):
    """``__call__``, ``with_call`` and ``future`` of unary-unary and stream-unary methods."""

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        # The inner with_call, not __call__: the response metadata is on the call it returns.
        response, _call = self.with_call(
            request, timeout, metadata, credentials, wait_for_ready, compression
        )
        return response

    def with_call(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> tuple[Any, grpc.Call]:
        observed = self._observer.begin(self._method, self._kind)
        call: Any = None
        try:
            response, call = self._inner.with_call(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        except grpc.RpcError as error:
            call = as_call(error)
            raise
        finally:  # the call has ended: its headers are final, or are read in this thread
            finish_call(observed, call, headers=_initial_metadata)
        return response, call

    def future(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        observed = self._observer.begin(self._method, self._kind)
        try:
            future = self._inner.future(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        except BaseException as error:  # end what begin() started (its span), re-raise as is
            finish_call(observed, as_call(error))
            raise
        future.add_done_callback(partial(finish_call, observed))
        return future


class _CountedUnaryResponse(_UnaryResponse):
    """Detection only (no telemetry): the plain ``__call__``, the hot path, counts the call
    straight into the observer, without an :class:`ObservedCall` or a wrapping frame."""

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        observer = self._observer
        started = observer.clock()
        try:
            response, call = self._inner.with_call(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        except BaseException as error:  # count it as the interceptor does, re-raise as is
            failed = as_call(error)
            if failed is None:
                observer.count(started, self._stream, None, None)
            else:
                observer.count(
                    started, self._stream, _initial_metadata(failed), failed.trailing_metadata
                )
            raise
        observer.count(started, self._stream, _initial_metadata(call), call.trailing_metadata)
        return response


class _StreamResponse(_Observed):
    """``__call__`` of unary-stream and stream-stream methods."""

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> ObservedStream:
        observed = self._observer.begin(self._method, self._kind)
        try:
            call = self._inner(request, timeout, metadata, credentials, wait_for_ready, compression)
        except BaseException as error:  # end what begin() started (its span), re-raise as is
            finish_call(observed, as_call(error))
            raise
        return ObservedStream(call, observed)


class _UnaryUnary(_UnaryResponse, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _CountedUnaryUnary(_CountedUnaryResponse, grpc.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _StreamUnary(_UnaryResponse, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _CountedStreamUnary(_CountedUnaryResponse, grpc.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _UnaryStream(_StreamResponse, grpc.UnaryStreamMultiCallable):  # type: ignore[misc]
    pass


class _StreamStream(_StreamResponse, grpc.StreamStreamMultiCallable):  # type: ignore[misc]
    pass


#: The multicallable of each call kind; without telemetry, unary responses have a leaner one.
_TRACED: dict[str, type[_Observed]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}
_COUNTED: dict[str, type[_Observed]] = {
    "unary_unary": _CountedUnaryUnary,
    "stream_unary": _CountedStreamUnary,
}


#: ``_accepts_registered_method`` by channel type: ``inspect.signature`` took half the time of
#: making an observed channel, and a type's signature does not change.
_REGISTERED_BY_TYPE: dict[type, bool] = {}


def _accepts_registered_method(channel: grpc.Channel) -> bool:
    """Whether ``channel.unary_unary`` takes grpcio's private ``_registered_method`` flag."""
    kind = type(channel)
    known = _REGISTERED_BY_TYPE.get(kind)
    if known is None:
        try:
            parameters = inspect.signature(channel.unary_unary).parameters.values()
        except (TypeError, ValueError):
            known = False
        else:
            known = any(
                p.name == "_registered_method" or p.kind is inspect.Parameter.VAR_KEYWORD
                for p in parameters
            )
        if len(_REGISTERED_BY_TYPE) < 64:
            _REGISTERED_BY_TYPE[kind] = known
    return known


class ObservedChannel(grpc.Channel):  # type: ignore[misc]
    """A channel that observes every call it makes through another channel; sync only.

    Args:
        channel: the channel that makes the calls; closed with this one.
        observer: what the calls are reported to (see :func:`build_observer`).
    """

    def __init__(self, channel: grpc.Channel, observer: CallObserver) -> None:
        self._channel = channel
        self.observer = observer
        self._front: grpc.Channel | None = None
        instrumented = instrumentation_parts(channel)
        if instrumented is not None:
            # opentelemetry-instrumentation-grpc's GrpcInstrumentorClient wraps each channel when
            # it is made, so its span would sit outside this wrapper, out of reach. Observe the
            # channel it wraps and put its interceptor back outside: its span is then current
            # while the call runs here, and gets the pod instead of a second span being made.
            raw, interceptor, intercept = instrumented
            self._channel = raw
            self._front = intercept(ObservedCore(self), interceptor)
        self._registered_method = _accepts_registered_method(self._channel)
        self._front_registered = self._front is not None and _accepts_registered_method(self._front)

    def __repr__(self) -> str:
        return f"<ObservedChannel {self.observer!r}>"

    @property
    def detector(self) -> AffinityDetector:
        return self.observer.detector

    def _observed(
        self,
        kind: str,
        method: str,
        request_serializer: Any,
        response_deserializer: Any,
        registered: bool | None,
    ) -> Any:
        if self._front is not None:
            front = getattr(self._front, kind)
            if registered and self._front_registered:
                return front(method, request_serializer, response_deserializer, True)
            return front(method, request_serializer, response_deserializer)
        return self._observed_core(
            kind, method, request_serializer, response_deserializer, registered
        )

    def _observed_core(
        self,
        kind: str,
        method: str,
        request_serializer: Any,
        response_deserializer: Any,
        registered: bool | None,
    ) -> Any:
        make = getattr(self._channel, kind)
        # Generated stubs pass _registered_method=True; channels that predate it (or wrappers
        # that do not forward it) must be called without it.
        if registered and self._registered_method:
            inner = make(method, request_serializer, response_deserializer, _registered_method=True)
        else:
            inner = make(method, request_serializer, response_deserializer)
        counted = self.observer.telemetry is None and kind in _COUNTED
        return (_COUNTED if counted else _TRACED)[kind](inner, self.observer, method, kind)

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        return self._observed(
            "unary_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.UnaryStreamMultiCallable:
        return self._observed(
            "unary_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamUnaryMultiCallable:
        return self._observed(
            "stream_unary", method, request_serializer, response_deserializer, _registered_method
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.StreamStreamMultiCallable:
        return self._observed(
            "stream_stream", method, request_serializer, response_deserializer, _registered_method
        )

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        """Close the inner channel and stop the probe made for this channel (``probe=True``)."""
        self.observer.close()
        self._channel.close()

    def __enter__(self) -> ObservedChannel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def observe_channel(
    channel: grpc.Channel,
    target: str,
    *,
    config: AffinityConfig | None = None,
    expected_pods: int | None = None,
    telemetry: CallTelemetry | None = None,
    probe: PodProbe | bool = False,
    registry: AffinityRegistry | None = None,
    lane: str | None = None,
) -> ObservedChannel:
    """Wrap ``channel`` so every call feeds ``target``'s affinity detector; sync channels only.

    Args:
        channel: a sync ``grpc.Channel`` (or an intercepted one); closed with the wrapper.
        target: the channel's target string (a channel cannot be asked for it); the detector is
            per target, the probe dials it.
        config: thresholds and windows; the first config given for a target wins.
        expected_pods: how many pods the target should have, if known.
        telemetry: an ``AffinityTelemetry`` for spans, metrics and alarms; None: detection only.
        probe: True for a :class:`PodProbe` with defaults, stopped when the channel is closed;
            or a configured one, which is yours to ``stop()``.
        registry: where the target's detector lives; default the process-wide registry.
        lane: the connection's name in telemetry; default ``lane-N``.
    """
    observer = build_observer(
        target,
        config=config,
        expected_pods=expected_pods,
        telemetry=telemetry,
        probe=probe,
        registry=registry,
        lane=lane,
    )
    return ObservedChannel(channel, observer)
