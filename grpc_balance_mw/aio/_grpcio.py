"""Every private ``grpc.aio`` name the package reads, each with its fallback.

The ``grpc.aio`` counterpart of :mod:`grpc_balance_mw._grpcio` (which also holds what both
flavours share: ``_registered_method``, a channel's target, the once-only warning). grpc.aio
gives a done-callback no way to read a call's end without awaiting it, an interceptor no way to
learn the channel its call runs on, and a channel no way to add interceptors after it is made.
Each reader here falls back to a public, slower or weaker way when a grpcio release moves the
name, and a fallback that loses something logs one WARNING per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import grpc.aio

from grpc_balance_mw._grpcio import (
    _GRPCIO_RELEASE,
    PROBE_METHOD,
    accepts_registered_method,
    channel_target,
    warn_once,
)

__all__ = [
    "FAST_PATHS",
    "INTERCEPTOR_LISTS",
    "accepts_registered_method",
    "append_interceptors",
    "call_starter",
    "final_state",
    "has_interceptors",
    "interceptor_channel",
    "live_fast_paths",
    "when_done",
]

_MISSING: Any = object()
_END_LOST = "each call's end is read by a task that awaits it"


def _aio_made(obj: Any) -> bool:
    return type(obj).__module__.startswith("grpc.aio.")


def final_state(call: Any) -> tuple[Any, Any, int | None] | None:
    """(initial metadata, trailing metadata, status code number) of a finished aio call, read
    off its core call (``_cython_call``) without awaiting: a done-callback cannot await. An
    intercepted call holds the call its interceptors made (``_interceptors_task``). None when
    grpcio keeps them elsewhere, or the interceptors failed: await the call instead."""
    core = getattr(call, "_cython_call", None)
    if core is None:
        task = getattr(call, "_interceptors_task", _MISSING)
        if task is _MISSING:
            if _aio_made(call):
                warn_once("aio call._cython_call", _END_LOST)
            return None
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        core = getattr(task.result(), "_cython_call", None)
    status = getattr(core, "_status", _MISSING)
    if status is None:
        return None
    if status is _MISSING:
        if core is not None:
            warn_once("aio call._cython_call._status", _END_LOST)
        return None
    return getattr(core, "_initial_metadata", None), status.trailing_metadata(), status.code()


#: Where grpc.aio keeps the task that starts a call: a unary response's, a response stream's.
_STARTERS = ("_call_response", "_preparation")


#: grpc.aio keeps a call's done-callbacks after they run before grpcio 1.84 (measured: 1.50,
#: 1.62.3 and eight releases from 1.66 to 1.83 keep them; 1.84 drops them).
DONE_CALLBACKS_KEPT = _GRPCIO_RELEASE < (1, 84)


def when_done(call: Any, callback: Callable[[Any], object]) -> None:
    """``callback(call)`` once ``call`` is done, as ``call.add_done_callback(callback)``, but
    leaving no reference cycle behind.

    Before grpcio 1.84, grpc.aio's ``Call.add_done_callback`` hands its core call
    ``partial(callback, call)``, and the core call keeps its done-callbacks after they run:
    every call with a done-callback is then a cycle, freed only by the cyclic garbage
    collector, and its core call holds the connection open past its channel's ``close()``. An
    intercepted call hands the call its interceptors made a partial bound to itself: the same
    cycle. There the core call gets a holder that lets go of the call and of ``callback`` once
    it has run; an intercepted call's holder waits on its interceptors' task (whose callbacks
    asyncio drops once run), then on the call they made. A call laid out otherwise, or a
    grpcio that drops its callbacks, takes ``callback`` the public way."""
    if not DONE_CALLBACKS_KEPT:
        call.add_done_callback(callback)
        return
    try:
        add = call._cython_call.add_done_callback
    except AttributeError:
        add = None
    if add is not None:
        add(partial(_fire_once, [call, callback]))  # C-made: cheaper than a holder object
        return
    task = getattr(call, "_interceptors_task", None)
    if isinstance(task, asyncio.Future):
        task.add_done_callback(partial(_after_interceptors, [call, callback]))
        return
    call.add_done_callback(callback)


def _fire_once(held: list[Any]) -> None:
    """A core call's done-callback (it takes no argument): ``callback(call)``, both let go."""
    if held:
        call, callback = held
        held.clear()
        callback(call)


def _after_interceptors(held: list[Any], task: asyncio.Future[Any]) -> None:
    """An intercepted call's interceptors are done: done now if they failed or their call has
    ended, else once the call they made ends."""
    made = None if task.cancelled() or task.exception() is not None else task.result()
    done = getattr(made, "done", None)
    if done is None or done():
        _fire_once(held)
    else:
        when_done(made, lambda _made: _fire_once(held))


def call_starter(call: Any) -> asyncio.Future[Any] | None:
    """grpc.aio's task that starts ``call`` (it fails when the call cannot start, e.g. a
    metadata value that is not a str), or None."""
    for name in _STARTERS:
        starter = getattr(call, name, None)
        if starter is not None:
            return starter if isinstance(starter, asyncio.Future) else None
    if type(call).__module__ == "grpc.aio._call":
        warn_once(
            "aio call._call_response/_preparation",
            "a call that cannot start is counted only when its channel closes",
        )
    return None


def interceptor_channel(continuation: Any) -> object | None:
    """The core channel a ``grpc.aio`` interceptor's ``continuation`` calls into, or None.

    grpc.aio's continuation is a ``functools.partial`` of the intercepted call's
    ``_run_interceptor``; that call keeps the channel's ``cygrpc.AioChannel`` as ``_channel``.
    Before grpcio 1.5x it is a partial of a closure over that call (``self``). A grpcio laid out
    otherwise gives None: the interceptors' calls then share one lane.
    """
    run = getattr(continuation, "func", None)
    call = getattr(run, "__self__", None)
    if call is None:
        try:
            call = run.__closure__[run.__code__.co_freevars.index("self")].cell_contents  # type: ignore[union-attr]
        except (AttributeError, ValueError, IndexError, TypeError):
            call = None
    channel = getattr(call, "_channel", None)
    if channel is None:
        warn_once(
            "aio continuation.func.__self__._channel",
            "an interceptor's calls all count on one lane",
        )
    return channel


#: grpc.aio keeps a channel's client interceptors in these lists (one per call kind).
INTERCEPTOR_LISTS = (
    "_unary_unary_interceptors",
    "_unary_stream_interceptors",
    "_stream_unary_interceptors",
    "_stream_stream_interceptors",
)
_LISTS_LOST = (
    "a channel made with interceptors (opentelemetry-instrumentation-grpc's) is observed "
    "without them: their spans get no pod"
)


def _lists_missing(channel: Any) -> bool:
    missing = not all(isinstance(getattr(channel, name, None), list) for name in INTERCEPTOR_LISTS)
    if missing and type(channel).__module__ == "grpc.aio._channel":
        warn_once("aio Channel._unary_unary_interceptors", _LISTS_LOST)
    return missing


def has_interceptors(channel: Any) -> bool:
    """Whether an aio channel was made with client interceptors."""
    if _lists_missing(channel):
        return False
    return any(getattr(channel, name) for name in INTERCEPTOR_LISTS)


def append_interceptors(channel: Any, interceptors: list[Any]) -> bool:
    """Put ``interceptors`` after the ones ``channel`` was made with; False if it has no lists.

    grpc.aio reads a channel's interceptor lists when a method's multicallable is made, and
    registers an object under the first kind it implements, so each per-kind object goes to the
    list of its kind.
    """
    if _lists_missing(channel):
        return False
    kinds = (
        grpc.aio.UnaryUnaryClientInterceptor,
        grpc.aio.UnaryStreamClientInterceptor,
        grpc.aio.StreamUnaryClientInterceptor,
        grpc.aio.StreamStreamClientInterceptor,
    )
    for interceptor in interceptors:
        for kind, name in zip(kinds, INTERCEPTOR_LISTS, strict=True):
            if isinstance(interceptor, kind):
                getattr(channel, name).append(interceptor)
                break
    return True


# --- which fast paths are live ---------------------------------------------------------------

#: The fast paths :func:`live_fast_paths` tries.
FAST_PATHS = (
    "final_state",
    "core_done_callback",
    "intercepted_final_state",
    "call_starter",
    "interceptor_channel",
    "interceptor_lists",
    "registered_method",
    "channel_target",
)


class _Recorder(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.found: list[object | None] = []

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.found.append(interceptor_channel(continuation))
        return await continuation(details, request)


async def _ended(call: Any) -> tuple[Any, Any, int | None] | None:
    """:func:`final_state` of ``call`` as its done-callback reads it."""
    seen: asyncio.Future[tuple[Any, Any, int | None] | None] = (
        asyncio.get_running_loop().create_future()
    )

    def read(done: Any) -> None:
        if not seen.done():
            seen.set_result(final_state(done))

    when_done(call, read)
    return await asyncio.wait_for(seen, 10.0)


async def live_fast_paths(target: str, timeout_s: float = 5.0) -> dict[str, bool]:
    """Each of :data:`FAST_PATHS`, tried on ``grpc.aio`` channels of its own to ``target`` (any
    gRPC server: the calls are to a method it does not have), True where the fast path works on
    this grpcio. ``registered_method`` is False on grpcio releases before it existed (1.62)."""
    live = dict.fromkeys(FAST_PATHS, False)
    unimplemented = grpc.StatusCode.UNIMPLEMENTED.value[0]
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary(PROBE_METHOD)(b"", timeout=timeout_s)
        stream = channel.unary_stream(PROBE_METHOD)(b"", timeout=timeout_s)
        states = [await _ended(unary), await _ended(stream)]
        live["final_state"] = all(state and state[2] == unimplemented for state in states)
        live["call_starter"] = all(
            isinstance(call_starter(call), asyncio.Future) for call in (unary, stream)
        )
        # Ended, its done-callback run, the call is freed with its last reference.
        with contextlib.suppress(grpc.aio.AioRpcError):
            await unary
        ended = weakref.ref(unary)
        del unary, stream
        live["core_done_callback"] = ended() is None
        live["registered_method"] = accepts_registered_method(channel)
        live["channel_target"] = channel_target(channel) == target
    recorder = _Recorder()
    async with grpc.aio.insecure_channel(target, interceptors=[recorder]) as channel:
        intercepted = channel.unary_unary(PROBE_METHOD)(b"", timeout=timeout_s)
        state = await _ended(intercepted)
        live["intercepted_final_state"] = state is not None and state[2] == unimplemented
        live["interceptor_channel"] = len(recorder.found) == 1 and type(
            recorder.found[0]
        ).__module__.startswith("grpc._cython")
        live["interceptor_lists"] = has_interceptors(channel) and append_interceptors(channel, [])
    return live
