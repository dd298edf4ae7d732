"""Every private grpcio and OpenTelemetry name the package reads (sync), each with its fallback.

grpcio gives no public way to read a finished call's metadata without taking its condition, to
make a blocking unary call without building a call object, to learn which channel an
interceptor's call runs on, a channel's target, or a connection's state without a polling
thread; OpenTelemetry keeps its "suppress instrumentation" key and its instrumentor singleton
private. The package reads those names here and nowhere else (``grpc_balance_mw/aio/_grpcio.py``
holds the ``grpc.aio`` ones). When a grpcio (or OpenTelemetry) release moves a name, each reader
falls back to a public, slower or weaker way; a fallback that loses something logs one WARNING
per process (:func:`warn_once`) naming the grpcio version and what is lost.

:func:`live_fast_paths` tries each fast path against a real server: tests/test_grpcio_internals.py
asserts they are all live, and scripts/test_grpcio_versions.sh runs it on the declared grpcio
floor, the newest release and the newest pre-release.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context

__all__ = [
    "AIO_TARGET_SINCE",
    "CONNECTING",
    "FAST_PATHS",
    "GRPCIO_VERSION",
    "IDLE",
    "INSTRUMENTATION_MODULE",
    "PROBE_METHOD",
    "READY",
    "REGISTERED_SINCE",
    "SHUTDOWN",
    "SUPPRESS_KEYS",
    "TRANSIENT_FAILURE",
    "accepts_registered_method",
    "blocking_unary_path",
    "call_state",
    "channel_target",
    "core_channel",
    "final_headers",
    "final_metadata",
    "final_trailers",
    "headers_now",
    "instrumentation_parts",
    "instrumentor_active",
    "interceptor_channel",
    "live_fast_paths",
    "metadata_now",
    "suppress_keys",
    "warn_once",
]

_log = logging.getLogger(__name__)

GRPCIO_VERSION: str = grpc.__version__


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string; (0, 0) if it has none."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


_GRPCIO_RELEASE = _release(GRPCIO_VERSION)

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(name: str, lost: str) -> None:
    """Log, once per process and ``name``, that grpcio (or OpenTelemetry) no longer has the
    private ``name`` where this package looks for it, and what the fallback loses."""
    with _warned_lock:
        if name in _warned:
            return
        _warned.add(name)
    _log.warning(
        "grpc_balance_mw: %s is not where this package reads it (grpcio %s); %s",
        name,
        GRPCIO_VERSION,
        lost,
    )


def _grpcio_made(obj: Any, *modules: str) -> bool:
    """Whether ``obj`` is an instance of a class defined in one of grpcio's ``modules``."""
    return type(obj).__module__ in modules


# --- a finished call's metadata: ``call._state`` ---------------------------------------------

#: What a fallback of the call-state readers loses.
_STATE_SLOW = "each call's metadata is read through the public methods, which take a lock"
_STATE_BLIND = "calls observed from a done-callback report no pod (counted as unknown)"


def _expects_state(call: Any) -> bool:
    """Whether ``call`` is grpcio's own call (or interceptor outcome), which keeps a state."""
    module = type(call).__module__
    return module == "grpc._channel" or (
        module == "grpc._interceptor" and not isinstance(call, BaseException)
    )


def final_headers(call: Any) -> Any:
    """``call.initial_metadata()`` of a call that has ended, read in the caller's thread.

    grpcio's public method takes the call's condition and builds a closure to wait on it, a
    measurable part of a warm unary call's budget; once the call has ended (as after a
    successful ``with_call``) the metadata is final and can be read off its state. Any other
    kind of call, or a grpcio without that state, goes through the public method, which may
    wait: never call this from a done-callback (see :func:`headers_now`).
    """
    state = getattr(call, "_state", None)
    if state is None and _expects_state(call):
        warn_once("call._state", _STATE_SLOW)
    metadata = getattr(state, "initial_metadata", None)
    return metadata if metadata is not None else call.initial_metadata()


def final_trailers(call: Any) -> Any:
    """``call.trailing_metadata()`` of a call that has ended, read off its state as
    :func:`final_headers` does (the public method takes the call's condition to wait for the
    end); a call that has not ended, or a grpcio without that state, goes the public way."""
    state = getattr(call, "_state", None)
    if state is not None and getattr(state, "code", None) is not None:
        return state.trailing_metadata
    return call.trailing_metadata()


def final_metadata(call: Any) -> tuple[Any, Any]:
    """``(final_headers(call), final_trailers(call))`` with one look at the call's state: what
    the detection-only hot path reads of every call that has ended."""
    try:
        state = call._state
        if state.code is not None and state.initial_metadata is not None:
            return state.initial_metadata, state.trailing_metadata
    except AttributeError:  # not grpcio's call, or a grpcio without that state
        pass
    return final_headers(call), final_trailers(call)


def call_state(call: Any) -> Any:
    """grpcio's state of ``call``, through interceptor outcomes (``_call``) and this package's
    response streams; None for any other kind of call (and, with a warning, for grpcio's own
    calls if this grpcio keeps their state elsewhere)."""
    for _ in range(4):
        state = getattr(call, "_state", None)
        if state is not None:
            return state
        inner = getattr(call, "_call", None)
        if inner is None:
            if _expects_state(call):
                warn_once("call._state", _STATE_BLIND)
            return None
        call = inner
    return None


def headers_now(call: Any) -> Any:
    """The initial metadata a call has received so far, without waiting; None if none yet.

    For done-callbacks. grpcio runs them on the channel's own event thread, and its
    ``initial_metadata()`` waits for an event that only that thread delivers: a stream that ends
    before any response header (UNIMPLEMENTED, a killed pod, a trailers-only abort) would block
    that thread past the call's deadline and wedge every later call on the channel. A call that
    ended without headers had a trailers-only response, so the pod, if any, is in its trailers.
    The state is found on grpcio's calls, through interceptor outcomes (``_call``) and through
    this package's response streams; any other kind of call answers None rather than risk the
    wait.
    """
    return getattr(call_state(call), "initial_metadata", None)


def metadata_now(call: Any) -> tuple[Any, Any]:
    """``(headers_now(call), trailers)`` with one walk to the call's state, for the
    detection-only done-callback: the trailers off the state once the call has ended, else the
    call's ``trailing_metadata`` method (for the observer to ask when it reads them)."""
    state = call_state(call)
    if state is None:
        return None, call.trailing_metadata
    ended = getattr(state, "code", None) is not None
    trailers = state.trailing_metadata if ended else call.trailing_metadata
    return getattr(state, "initial_metadata", None), trailers


# --- the blocking unary-unary path: ``_blocking`` and ``_end_unary_response_blocking`` ------

#: (``inner._blocking``, ``end``) by multicallable class, or None for a class laid out otherwise.
_BLOCKING_PATHS: dict[type, Callable[..., Any] | None] = {}
_BLOCKING_PARAMETERS = [
    "self",
    "request",
    "timeout",
    "metadata",
    "credentials",
    "wait_for_ready",
    "compression",
]
_END_PARAMETERS = ["state", "call", "with_call", "deadline"]


def _blocking_end(cls: type) -> Callable[..., Any] | None:
    try:
        from grpc import _channel

        end = _channel._end_unary_response_blocking
        if (
            issubclass(cls, _channel._UnaryUnaryMultiCallable)
            and list(inspect.signature(cls._blocking).parameters) == _BLOCKING_PARAMETERS  # type: ignore[attr-defined]
            and list(inspect.signature(end).parameters) == _END_PARAMETERS
        ):
            return end  # type: ignore[no-any-return]
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    return None


def blocking_unary_path(inner: Any) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """How grpcio itself makes a blocking unary-unary call on ``inner``, if it is grpcio's own
    multicallable (or a subclass) laid out as grpcio 1.50 and later lay it out (checked once
    per class): ``(blocking, end)``, where ``blocking(request, timeout, metadata, credentials,
    wait_for_ready, compression)`` returns ``(state, call)``, the state's ``initial_metadata``
    and ``trailing_metadata`` are the call's, and ``end(state, call, False, None)`` gives the
    response or raises the call's error. None: call ``with_call`` instead (a call object per
    call, a little slower)."""
    cls = type(inner)
    try:
        end = _BLOCKING_PATHS[cls]
    except KeyError:
        end = _blocking_end(cls)
        if len(_BLOCKING_PATHS) < 64:
            _BLOCKING_PATHS[cls] = end
        if end is None and cls.__module__ == "grpc._channel":
            warn_once(
                "_channel._end_unary_response_blocking",
                "detection-only unary calls go through with_call, a call object each",
            )
    if end is None:
        return None
    return inner._blocking, end


# --- ``_registered_method`` ------------------------------------------------------------------

#: :func:`accepts_registered_method` by channel type: a type's signature does not change, and
#: ``inspect.signature`` is slow.
_REGISTERED_BY_TYPE: dict[type, bool] = {}
#: grpcio's own channels take ``_registered_method`` from this release on (generated stubs pass
#: it to have the method registered with the core channel once).
REGISTERED_SINCE = (1, 62)
#: ... and grpc.aio's core channel shows its target (``cygrpc.AioChannel.target``).
AIO_TARGET_SINCE = (1, 62)


def accepts_registered_method(channel: Any) -> bool:
    """Whether ``channel.unary_unary`` (sync or aio) takes grpcio's private
    ``_registered_method`` flag; channels that predate it (or wrappers that do not forward it)
    must be called without it."""
    kind = type(channel)
    known = _REGISTERED_BY_TYPE.get(kind)
    if known is None:
        try:
            parameters = inspect.signature(channel.unary_unary).parameters.values()
        except (TypeError, ValueError, AttributeError):
            known = False
        else:
            known = any(
                p.name == "_registered_method" or p.kind is inspect.Parameter.VAR_KEYWORD
                for p in parameters
            )
        if len(_REGISTERED_BY_TYPE) < 64:
            _REGISTERED_BY_TYPE[kind] = known
        if (
            not known
            and _GRPCIO_RELEASE >= REGISTERED_SINCE
            and kind.__module__ in ("grpc._channel", "grpc.aio._channel")
        ):
            warn_once(
                "Channel.unary_unary(_registered_method=)",
                "generated stubs' methods are not registered with the core channel",
            )
    return known


# --- the channel under a sync interceptor's continuation -------------------------------------

#: The code object of the last continuation seen, and the index of its ``self`` cell.
_self_cell: tuple[Any, int] = (None, 0)
#: The last multicallable whose channel was found, and that channel, both weakly referenced.
_last_found: tuple[Callable[[], Any], Callable[[], Any]] = (lambda: None, lambda: None)
_UNDER_LOST = "an interceptor's calls all count on one lane"


def interceptor_channel(continuation: Any) -> object | None:
    """The channel a sync interceptor's ``continuation`` calls into, or None if unknown.

    grpcio gives an interceptor no way to ask which channel a call runs on; its continuation is
    a closure over the multicallable (``self``), whose ``_thunk`` closes over the intercepting
    ``grpc._interceptor._Channel`` (``self``) and so the channel it wraps. Intercepting wrappers
    are followed down to the channel that owns the connection. A grpcio laid out otherwise gives
    None: the interceptor's calls then share one lane. The walk is remembered for the last
    multicallable (one stub method called in a loop walks once).
    """
    global _self_cell, _last_found
    try:
        code = continuation.__code__
        seen, index = _self_cell
        if code is not seen:
            index = code.co_freevars.index("self")
            _self_cell = (code, index)
        multicallable = continuation.__closure__[index].cell_contents
    except (AttributeError, ValueError, IndexError, TypeError):
        if getattr(continuation, "__module__", None) == "grpc._interceptor":
            warn_once("the continuation's self", _UNDER_LOST)
        return None
    found_for, found = _last_found
    if found_for() is multicallable:
        known: object | None = found()
        if known is not None:
            return known
    channel = _channel_under(multicallable)
    if channel is not None:
        with contextlib.suppress(TypeError):  # not weakly referenceable: walk every time
            _last_found = (weakref.ref(multicallable), weakref.ref(channel))
    return channel


def _channel_under(multicallable: Any) -> object | None:
    """The channel under an intercepting multicallable (see :func:`interceptor_channel`)."""
    try:
        thunk = multicallable._thunk
        channel: object = thunk.__closure__[thunk.__code__.co_freevars.index("self")].cell_contents
    except (AttributeError, ValueError, IndexError, TypeError):
        if type(multicallable).__module__ == "grpc._interceptor":
            warn_once("_interceptor multicallable._thunk", _UNDER_LOST)
        return None
    for _ in range(16):  # intercept_channel(intercept_channel(...)): the channel underneath
        if type(channel).__module__ != "grpc._interceptor":
            return channel
        channel = getattr(channel, "_channel", None)
        if channel is None:
            warn_once("_interceptor._Channel._channel", _UNDER_LOST)
            return None
    return None


# --- a channel's target: ``_target``, ``_channel``, the core channel's ``target`` ------------


def channel_target(channel: Any) -> str | None:
    """The target string a grpcio channel (sync or aio, intercepted or not) was made with.

    grpcio exposes no public accessor; its channels keep a core channel whose ``target()`` gives
    the string back. Wrappers (``grpc.intercept_channel``, opentelemetry-instrumentation-grpc,
    this package's own) keep the channel they wrap as ``_channel``, so the chain is followed a
    few steps. None when no step has it: the caller must then be told the target.
    """
    seen = channel
    for _ in range(8):
        if type(seen).__module__ == "grpc._channel":
            # The sync channel keeps the string as given; its core has it canonicalised
            # ("host:port" becomes "dns:///host:port"), which would be another detector's key.
            given = getattr(seen, "_target", None)
            if isinstance(given, str):
                return given
        core = getattr(seen, "_channel", None)
        if core is None:
            break
        target = getattr(core, "target", None)
        if target is not None and type(core).__module__.startswith("grpc._cython"):
            # cygrpc.Channel has a target() method; cygrpc.AioChannel a target attribute.
            value = target() if callable(target) else target
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return value if isinstance(value, str) else None
        seen = core
    # grpc.aio channels before grpcio 1.62 keep their target where Python cannot read it.
    if _grpcio_made(seen, "grpc._channel") or (
        _GRPCIO_RELEASE >= AIO_TARGET_SINCE and _grpcio_made(seen, "grpc.aio._channel")
    ):
        warn_once("Channel._target", "observe() must be told the target (observe(target=...))")
    return None


# --- connectivity without a polling thread: the core channel's ``check_connectivity_state`` --

#: The core's connectivity numbers (``grpc_connectivity_state``), as grpcio's public enum has them.
IDLE: int = grpc.ChannelConnectivity.IDLE.value[0]
CONNECTING: int = grpc.ChannelConnectivity.CONNECTING.value[0]
READY: int = grpc.ChannelConnectivity.READY.value[0]
TRANSIENT_FAILURE: int = grpc.ChannelConnectivity.TRANSIENT_FAILURE.value[0]
SHUTDOWN: int = grpc.ChannelConnectivity.SHUTDOWN.value[0]


def core_channel(channel: Any) -> Any | None:
    """The C-core channel under a sync grpcio channel, or None if there is none to be found.

    grpcio has no public way to start a channel's connection and read its state without a
    thread per channel (``subscribe`` and ``channel_ready_future`` each start a polling thread;
    "we'd rather not poll", grpc/grpc#3064). Its ``grpc._channel.Channel`` keeps a
    ``cygrpc.Channel`` as ``_channel``, whose ``check_connectivity_state(try_to_connect)``
    (what that polling thread calls) starts the connection and returns one of the numbers above
    without blocking (ValueError once closed). Wrappers (``grpc.intercept_channel``, this
    package's) keep what they wrap as ``_channel`` too, so the chain is followed a few steps.
    """
    seen = channel
    for _ in range(8):
        below = getattr(seen, "_channel", None)
        if below is None:
            break
        if type(below).__module__.startswith("grpc._cython") and callable(
            getattr(below, "check_connectivity_state", None)
        ):
            return below
        seen = below
    if _grpcio_made(seen, "grpc._channel"):
        warn_once(
            "Channel._channel.check_connectivity_state",
            "connections dialled ahead are connected by a health check, one at a time",
        )
    return None


# --- OpenTelemetry ---------------------------------------------------------------------------


def suppress_keys() -> tuple[str, ...]:
    """The context keys that tell OpenTelemetry's instrumentations to make no span:
    opentelemetry-api's private ``_SUPPRESS_INSTRUMENTATION_KEY`` (what
    opentelemetry-instrumentation-grpc 0.36b0 checks) and the plain string that later
    instrumentations also honour."""
    key = getattr(otel_context, "_SUPPRESS_INSTRUMENTATION_KEY", None)
    if not isinstance(key, str):
        warn_once(
            "opentelemetry.context._SUPPRESS_INSTRUMENTATION_KEY",
            "older OpenTelemetry instrumentations may trace this package's own health checks "
            "and probes",
        )
        return ("suppress_instrumentation",)
    return (key, "suppress_instrumentation")


SUPPRESS_KEYS: tuple[str, ...] = suppress_keys()

#: opentelemetry-instrumentation-grpc's module; found in ``sys.modules``, never imported here.
INSTRUMENTATION_MODULE = "opentelemetry.instrumentation.grpc"


def instrumentor_active() -> bool:
    """Whether ``GrpcInstrumentorClient`` is instrumenting (without importing it if unused):
    ``BaseInstrumentor`` keeps its one instance as ``_instance``."""
    module = sys.modules.get(INSTRUMENTATION_MODULE)
    if module is None:
        return False
    client = getattr(module, "GrpcInstrumentorClient", None)
    try:
        instrumentor = client._instance  # type: ignore[union-attr]
    except AttributeError:
        warn_once(
            "GrpcInstrumentorClient._instance",
            "spans are made even when opentelemetry-instrumentation-grpc makes one per call",
        )
        return False
    return bool(getattr(instrumentor, "is_instrumented_by_opentelemetry", False))


def instrumentation_parts(channel: Any) -> tuple[Any, Any, Callable[..., Any]] | None:
    """(wrapped channel, interceptor, intercept_channel) of a channel that
    opentelemetry-instrumentation-grpc intercepted, or None for any other channel."""
    if not type(channel).__module__.startswith(INSTRUMENTATION_MODULE):
        return None
    raw = getattr(channel, "_channel", None)
    interceptor = getattr(channel, "_interceptor", None)
    intercept = getattr(
        sys.modules.get(INSTRUMENTATION_MODULE + ".grpcext"), "intercept_channel", None
    )
    if raw is None or interceptor is None or intercept is None:
        warn_once(
            "opentelemetry-instrumentation-grpc's _InterceptorChannel._channel/_interceptor",
            "its span is not enriched with the pod",
        )
        return None
    return raw, interceptor, intercept


# --- which fast paths are live ---------------------------------------------------------------

#: The fast paths :func:`live_fast_paths` tries.
FAST_PATHS = (
    "call_state",
    "blocking_unary",
    "registered_method",
    "interceptor_channel",
    "channel_target",
    "core_connectivity",
    "otel_suppress_key",
    "otel_instrumentor_instance",
    "otel_channel_parts",
)
#: Any server answers it UNIMPLEMENTED: a finished call without touching the server's services.
PROBE_METHOD = "/grpc_balance_mw.Probe/Nothing"


def _has_state(call: Any) -> bool:
    state = getattr(call, "_state", None)
    return all(hasattr(state, name) for name in ("initial_metadata", "trailing_metadata", "code"))


class _Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.found: list[object | None] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.found.append(interceptor_channel(continuation))
        return continuation(details, request)


def live_fast_paths(target: str, timeout_s: float = 5.0) -> dict[str, bool]:
    """Each of :data:`FAST_PATHS`, tried on a channel of its own to ``target`` (any gRPC server:
    the calls are to a method it does not have), True where the fast path works on this grpcio.
    ``registered_method`` is False on grpcio releases before it existed (1.62)."""
    live = dict.fromkeys(FAST_PATHS, False)
    with grpc.insecure_channel(target) as channel:
        inner = channel.unary_unary(PROBE_METHOD)
        failed: Any = None
        try:
            inner(b"", timeout=timeout_s)
        except grpc.RpcError as error:
            failed = error
        future = inner.future(b"", timeout=timeout_s)
        with contextlib.suppress(grpc.RpcError):
            future.result()
        live["call_state"] = (
            _has_state(failed)
            and _has_state(future)
            and failed._state.code is grpc.StatusCode.UNIMPLEMENTED
        )
        path = blocking_unary_path(inner)
        if path is not None:
            blocking, end = path
            state, core_call = blocking(b"", timeout_s, None, None, None, None)
            try:
                end(state, core_call, False, None)
            except grpc.RpcError as error:
                live["blocking_unary"] = (
                    error.code() is grpc.StatusCode.UNIMPLEMENTED
                    and hasattr(state, "initial_metadata")
                    and state.trailing_metadata is not None
                )
        live["registered_method"] = accepts_registered_method(channel)
        recorder = _Recorder()
        intercepted = grpc.intercept_channel(grpc.intercept_channel(channel, recorder), recorder)
        with contextlib.suppress(grpc.RpcError):
            intercepted.unary_unary(PROBE_METHOD)(b"", timeout=timeout_s)
        live["interceptor_channel"] = recorder.found == [channel, channel]
        live["channel_target"] = channel_target(intercepted) == target
        core = core_channel(intercepted)
        live["core_connectivity"] = core is not None and core.check_connectivity_state(False) in (
            IDLE,
            CONNECTING,
            READY,
        )
        live["otel_suppress_key"] = len(suppress_keys()) == 2
        try:
            from opentelemetry.instrumentation.grpc import (
                GrpcInstrumentorClient,
                client_interceptor,
            )
            from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
        except ImportError:  # not installed: nothing of it is read either
            del live["otel_instrumentor_instance"], live["otel_channel_parts"]
        else:
            instance = GrpcInstrumentorClient()  # type: ignore[no-untyped-call]
            live["otel_instrumentor_instance"] = GrpcInstrumentorClient._instance is instance
            traced = intercept_channel(channel, client_interceptor())  # type: ignore[no-untyped-call]
            live["otel_channel_parts"] = (instrumentation_parts(traced) or (None,))[0] is channel
    return live
