"""The sync observed channel: a ``grpc.Channel`` that sees which pod served each call.

:class:`ObservedChannel` feeds the same :class:`CallObserver` as the interceptor form
(:func:`grpc_balance_mw.interceptors.affinity_interceptors`) but wraps the inner channel's
multicallables directly: ``grpc.intercept_channel`` wraps every call in a client-call-details
object, a continuation closure and an outcome future, a measurable part of a warm unary call.
Stubs and ``grpc.intercept_channel`` accept it as they accept any channel.
opentelemetry-instrumentation-grpc's interceptor, when the instrumentor put it on the channel,
is moved back outside this wrapper so its span gets the pod.

Without telemetry, the plain ``__call__`` of unary-response methods (the common call) counts the
call straight into the observer (``CallObserver.count``) without an ``ObservedCall``.

The balanced and dial-per-request channels observe their lanes with it; ``observe()``
(:mod:`grpc_balance_mw.observed_channel`), which may also move calls onto a balanced channel,
sits above them and wraps the user's channel with it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import grpc

from grpc_balance_mw._grpcio import accepts_registered_method, blocking_unary_path
from grpc_balance_mw._routing import MethodSpec, channel_method
from grpc_balance_mw.affinity.detector import JUDGE_EVERY_CALLS
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.call_kinds import SYNC_MULTICALLABLES, by_response, kind_classes
from grpc_balance_mw.instrumentation import ObservedCore, instrumentation_parts
from grpc_balance_mw.observed_calls import (
    ObservedStream,
    as_call,
    final_headers,
    final_metadata,
    finish_call,
)
from grpc_balance_mw.observing import ObservedMethod, Observes

if TYPE_CHECKING:  # the sync rebalancer opens a balanced channel, which observes with this
    from grpc_balance_mw.rebalance import Rebalancer

__all__ = ["ObservedChannel"]


class _UnaryResponse(ObservedMethod):
    """``__call__``, ``with_call`` and ``future`` of unary-unary and stream-unary methods.

    Arguments go to the inner multicallable as they were given: it is grpc's own (or the
    user's), so this wrapper takes exactly what it takes."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        # The inner with_call, not __call__: the response metadata is on the call it returns.
        response, _call = self.with_call(request, *args, **kwargs)
        return response

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> tuple[Any, grpc.Call]:
        observed = self._observer.begin(self._method, self._kind)
        call: Any = None
        try:
            response, call = self._inner.with_call(request, *args, **kwargs)
        except grpc.RpcError as error:
            call = as_call(error)
            raise
        finally:  # the call has ended: its headers are final, or are read in this thread
            finish_call(observed, call, headers=final_headers)
        return response, call

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        observed = self._observer.begin(self._method, self._kind)
        try:
            future = self._inner.future(request, *args, **kwargs)
        except BaseException as error:  # end what begin() started (its span), re-raise as is
            finish_call(observed, as_call(error))
            raise
        future.add_done_callback(partial(finish_call, observed))
        return future


class _CoreUnaryResponse(_UnaryResponse):
    """A unary response whose plain ``__call__`` may run the call as grpcio's own does: on
    grpcio's unary-unary multicallable, ``_blocking`` then ``_end`` (see
    :func:`~grpc_balance_mw._grpcio.blocking_unary_path`), the metadata read off the call's
    state; else (``_blocking`` None) through ``with_call``."""

    def __init__(self, inner: Any, observer: CallObserver, method: str | bytes, kind: str) -> None:
        super().__init__(inner, observer, method, kind)
        path = blocking_unary_path(inner) if kind == "unary_unary" else None
        self._blocking: Callable[..., Any] | None = None if path is None else path[0]
        self._end = None if path is None else path[1]


class _TracedUnaryResponse(_CoreUnaryResponse):
    """With telemetry: the plain ``__call__`` finishes the span from the call's state, as
    :class:`_CountedUnaryResponse` counts from it; no call object built for ``with_call``."""

    def __call__(
        self,
        request: Any,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        blocking = self._blocking
        if blocking is None:
            return super().__call__(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        observed = self._observer.begin(self._method, self._kind)
        try:
            state, core_call = blocking(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        except BaseException as error:  # e.g. the request did not serialize
            finish_call(observed, as_call(error))
            raise
        code = state.code
        observed.finish(
            state.initial_metadata,
            state.trailing_metadata,
            None if code is None else code.value[0],
        )
        return self._end(state, core_call, False, None)  # type: ignore[misc]


class _CountedUnaryResponse(_CoreUnaryResponse):
    """Detection only (no telemetry): the plain ``__call__``, the hot path, counts the call
    straight into the observer, without an :class:`ObservedCall` or a wrapping frame.

    On grpcio's own unary-unary multicallable it runs the call the way grpcio's ``__call__``
    does (``_blocking``, then the response or the call's error) and reads the metadata off the
    call's state: ``with_call`` would build a call object (a rendezvous) only to be read and
    dropped, which with 32 threads on one channel cost about 4 % of the client's CPU per call.
    """

    def __init__(self, inner: Any, observer: CallObserver, method: str | bytes, kind: str) -> None:
        super().__init__(inner, observer, method, kind)
        # What CallObserver.count_unary reads when it has seen a call like this one; and the
        # last such call's (headers, trailers, what): the next call's headers are most often
        # equal, and comparing is cheaper than hashing the new strings gRPC made of them.
        self._unary_calls = observer.unary_calls
        self._last_unary: tuple[Any, Any, Any] = (None, None, None)
        self._waiting = observer.detector.waiting

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
        blocking = self._blocking
        if blocking is not None:  # unary-unary: no duration to weigh, no clock to read first
            try:
                state, core_call = blocking(
                    request, timeout, metadata, credentials, wait_for_ready, compression
                )
            except BaseException as error:  # e.g. the request did not serialize
                self._count_failed(None, error)
                raise
            # count_unary, inlined for a call like one seen before: under 32 threads on one
            # channel, every Python frame a call adds is paid several times over in contention.
            initial, trailing = state.initial_metadata, state.trailing_metadata
            last, trailers, what = self._last_unary
            if last != initial:
                try:
                    _, trailers, what = self._unary_calls[initial]
                    self._last_unary = (initial, trailers, what)
                except (KeyError, TypeError):  # not seen yet, or not a tuple
                    trailers = what = None
            if what is None or trailing != trailers:
                observer.count_unary(initial, trailing)
            else:
                now = observer.clock()
                waiting = self._waiting
                waiting.append((what, now))
                if len(waiting) >= JUDGE_EVERY_CALLS:
                    observer.detector.judge_waiting()
                if observer.probe is not None:
                    observer.probe.maybe_probe(now)
            return self._end(state, core_call, False, None)  # type: ignore[misc]
        started = observer.clock()
        try:
            response, call = self._inner.with_call(
                request, timeout, metadata, credentials, wait_for_ready, compression
            )
        except BaseException as error:  # count it as the interceptor does, re-raise as is
            self._count_failed(started, error)
            raise
        headers, trailers = final_metadata(call)
        observer.count(started, self._stream, headers, trailers)
        return response

    def _count_failed(self, started: float | None, error: BaseException) -> None:
        """Count a call that raised: its metadata if the error is the call, else none."""
        failed = as_call(error)
        if failed is None:
            self._observer.count(started, self._stream, None, None)
        else:
            self._observer.count(started, self._stream, *final_metadata(failed))
            if failed.code() is grpc.StatusCode.UNAVAILABLE:
                self._observer.unavailable(*final_metadata(failed))


class _StreamResponse(ObservedMethod):
    """``__call__`` of unary-stream and stream-stream methods (arguments as given)."""

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> ObservedStream:
        observed = self._observer.begin(self._method, self._kind)
        try:
            call = self._inner(request, *args, **kwargs)
        except BaseException as error:  # end what begin() started (its span), re-raise as is
            finish_call(observed, as_call(error))
            raise
        return ObservedStream(call, observed)


#: The multicallable of each call kind; without telemetry, unary responses have a leaner one.
_TRACED = kind_classes(by_response(_TracedUnaryResponse, _StreamResponse), SYNC_MULTICALLABLES)
_COUNTED = kind_classes(by_response(_CountedUnaryResponse, _StreamResponse), SYNC_MULTICALLABLES)


class ObservedChannel(Observes, grpc.Channel):  # type: ignore[misc]
    """A channel that observes every call it makes through another channel; sync only.

    Args:
        channel: the channel that makes the calls; closed with this one.
        observer: what the calls are reported to (see :func:`build_observer`).
        rebalancer: moves later calls onto lanes when it opens them (see
            :func:`grpc_balance_mw.observed_channel.observe`).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        observer: CallObserver,
        *,
        rebalancer: Rebalancer | None = None,
    ) -> None:
        self._channel = channel
        self.observer = observer
        self.rebalancer = rebalancer
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
        self._registered_method = accepts_registered_method(self._channel)
        self._front_registered = self._front is not None and accepts_registered_method(self._front)

    def __repr__(self) -> str:
        return f"<ObservedChannel {self.observer!r}>"

    def _method(self, spec: MethodSpec) -> Any:
        here = self._here(spec)
        if self.rebalancer is None:
            return here
        return self.rebalancer.rerouted(here, spec)

    def _here(self, spec: MethodSpec) -> Any:
        """A method's multicallable on the observed channel itself."""
        if self._front is None:
            return self._observed_core(*spec)
        front = getattr(self._front, spec.kind)
        args = (spec.method, spec.request_serializer, spec.response_deserializer)
        return front(*args, True) if spec.registered and self._front_registered else front(*args)

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
        kinds = _COUNTED if self.observer.telemetry is None else _TRACED
        return kinds[kind](inner, self.observer, method, kind)

    unary_unary = channel_method("unary_unary")
    unary_stream = channel_method("unary_stream")
    stream_unary = channel_method("stream_unary")
    stream_stream = channel_method("stream_stream")

    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        """Close the inner channel (and the lanes, if calls moved onto them), and stop the probe
        made for this channel (``probe=True``)."""
        if self.rebalancer is not None:
            self.rebalancer.close()
        self.observer.close()
        self._channel.close()

    def __enter__(self) -> ObservedChannel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
