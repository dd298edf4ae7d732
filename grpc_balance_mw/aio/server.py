"""Server side, asyncio (``grpc.aio.server``): the same names as :mod:`grpc_balance_mw.server`.

Usage::

    server = grpc.aio.server(
        interceptors=[PodIdentityInterceptor(PodIdentity.from_env())],
        options=connection_age_options(max_age_s=30),
    )
    health = await add_health(server)
    await server.start()
    drain_on_signals(server, health)  # SIGTERM: NOT_SERVING, serve DRAIN_S more, then stop
    await server.wait_for_termination()
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from grpc_balance_mw._health import (
    DRAIN_S,
    GRACE_S,
    UNKNOWN_SERVICE,
    HealthReport,
    check_drain,
    health_handler,
)
from grpc_balance_mw._stamping import (
    CallStamp,
    IdentityStamper,
    StampedStatus,
    StampingContext,
)
from grpc_balance_mw.identity import merge_identity

_log = logging.getLogger(__name__)

__all__ = [
    "DRAIN_S",
    "GRACE_S",
    "PodHealth",
    "PodIdentityInterceptor",
    "add_health",
    "drain",
    "drain_on_signals",
]


class _StampingContext(StampingContext):
    """A ``grpc.aio.ServicerContext`` that adds the pod identity to the metadata that goes out,
    as the sync one does (see :class:`~grpc_balance_mw._stamping.StampingContext`); its
    ``write`` sends the identity first."""

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._initial_sent = True
        await self._context.send_initial_metadata(merge_identity(initial_metadata, self._stamp))

    async def write(self, message: Any) -> None:
        await self.flush()
        await self._context.write(message)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        await self.flush()
        self._trailing = trailing_metadata
        stamp = self.end(failed=True)  # before the abort: it sends the status at once
        await self._context.abort(code, details, merge_identity(trailing_metadata, stamp))

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.flush()
        self._trailing = getattr(status, "trailing_metadata", None)
        result = self._context.abort_with_status(StampedStatus.of(status, self.end(failed=True)))
        if inspect.isawaitable(result):
            await result

    async def flush(self) -> None:
        """Send the identity as initial metadata unless something already went out."""
        if not self._flush_due():
            return
        try:
            await self._context.send_initial_metadata(self._stamp)
        except (grpc.aio.UsageError, grpc.RpcError, ValueError) as exc:
            # Cancelled, or already finished: the trailers still carry the identity.
            _log.debug("could not send the pod identity as initial metadata: %s", exc)


async def _maybe_await(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


def _unary_response(
    behavior: Callable[..., Any], stamp: CallStamp
) -> Callable[..., Awaitable[Any]]:
    async def stamped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        ctx = _StampingContext(context, stamp)
        failed = True
        try:
            response = await _maybe_await(behavior(request, ctx))
            failed = False
            return response
        except asyncio.CancelledError:  # the client went away: not the pod's error
            failed = False
            raise
        finally:
            await ctx.flush()
            ctx.end(failed)

    return stamped


def _stream_response(behavior: Callable[..., Any], stamp: CallStamp) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behavior):
        # A coroutine that writes with ``context.write()`` (or a sync handler): the context's
        # ``write`` flushes the identity first.
        return _unary_response(behavior, stamp)

    async def stamped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        ctx = _StampingContext(context, stamp)
        responses = behavior(request, ctx)
        failed = True
        try:
            async for response in responses:
                await ctx.flush()
                yield response
            failed = False
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            failed = False
            raise
        finally:
            await ctx.flush()
            ctx.end(failed)
            await responses.aclose()

    return stamped


class PodIdentityInterceptor(IdentityStamper, grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Stamps the serving pod's identity on every response, all four call kinds.

    See :class:`grpc_balance_mw.server.PodIdentityInterceptor` (and its ``load_meter``);
    handlers may be async generators or coroutines that ``await context.write()``.
    """

    _wraps = (_unary_response, _stream_response)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        return self._stamped(await continuation(handler_call_details), handler_call_details.method)


class PodHealth(HealthReport):
    """The standard ``grpc.health.v1`` service of one aio server (``Check`` and ``Watch``).

    See :class:`grpc_balance_mw.server.PodHealth`; :meth:`set`, :meth:`set_serving` and
    :meth:`enter_graceful_shutdown` are coroutines, as on grpcio-health-checking's aio servicer.
    Use it from the server's event loop.
    """

    def __init__(self, services: tuple[str, ...]) -> None:
        super().__init__(services)
        self._changed = asyncio.Condition()

    @property
    def servicer(self) -> PodHealth:
        """This object: what had ``set()`` and ``enter_graceful_shutdown()`` before 0.3."""
        return self

    async def set(self, service: str, status: int) -> None:
        """Report ``status`` (a ``ServingStatus`` number) for ``service``; ignored once the
        graceful shutdown began."""
        async with self._changed:
            if self._record(service, status):
                self._changed.notify_all()

    async def set_serving(self, serving: bool) -> None:
        """Report every registered service (and the server as a whole, ``""``) as (not) serving."""
        for service, status in self._statuses(serving):
            await self.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Permanently report NOT_SERVING, so clients and DNS stop sending new work."""
        async with self._changed:
            if self._record_shutdown():
                self._changed.notify_all()

    async def _check(self, service: str, context: grpc.aio.ServicerContext) -> int:
        status = self.check_status(service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, UNKNOWN_SERVICE)
            raise AssertionError("unreachable: abort() raises")
        return status

    async def _watch(self, service: str, context: grpc.aio.ServicerContext) -> AsyncIterator[int]:
        sent: int | None = None
        while True:  # ends when the call does: grpc cancels the task that runs it
            async with self._changed:
                while self.watch_status(service) == sent:
                    await self._changed.wait()
                sent = self.watch_status(service)
            yield sent


async def add_health(server: grpc.aio.Server, services: tuple[str, ...] = ()) -> PodHealth:
    """Serve ``grpc.health.v1.Health`` on ``server`` and flip it to NOT_SERVING on ``stop()``.

    See :func:`grpc_balance_mw.server.add_health`; ``await server.stop(grace)`` reports
    NOT_SERVING before the graceful stop begins, but only :func:`drain` gives clients the time
    to see it.
    """
    pod_health = PodHealth(tuple(services))
    server.add_generic_rpc_handlers((health_handler(pod_health._check, pod_health._watch),))
    await pod_health.set_serving(True)
    stop = server.stop

    async def stop_after_flip(grace: float | None) -> None:
        await pod_health.enter_graceful_shutdown()
        await stop(grace)

    server.stop = stop_after_flip
    return pod_health


async def drain(
    server: grpc.aio.Server,
    health: PodHealth,
    *,
    drain_s: float = DRAIN_S,
    grace_s: float = GRACE_S,
) -> None:
    """NOT_SERVING, keep serving ``drain_s``, then stop with ``grace_s``.

    See :func:`grpc_balance_mw.server.drain`.
    """
    check_drain(drain_s, grace_s)
    await health.enter_graceful_shutdown()
    await asyncio.sleep(drain_s)
    await server.stop(grace_s)


def drain_on_signals(
    server: grpc.aio.Server,
    health: PodHealth,
    *,
    drain_s: float = DRAIN_S,
    grace_s: float = GRACE_S,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> asyncio.Future[None]:
    """On the first of ``signals``, :func:`drain` in a task of the running loop.

    A second signal stops the server at once. See
    :func:`grpc_balance_mw.server.drain_on_signals`.

    Returns:
        a future done once the server has stopped.
    """
    check_drain(drain_s, grace_s)
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[None] = loop.create_future()
    tasks: list[asyncio.Task[None]] = []  # held here: the loop keeps only weak references

    def finished(task: asyncio.Task[None]) -> None:
        if stopped.done():
            return
        if task.cancelled():
            stopped.cancel()
        elif (error := task.exception()) is not None:
            stopped.set_exception(error)
        else:
            stopped.set_result(None)

    def on_signal(signum: int) -> None:
        if not tasks:
            _log.info("signal %d: draining for %.1f s, then stopping", signum, drain_s)
            task = loop.create_task(drain(server, health, drain_s=drain_s, grace_s=grace_s))
            task.add_done_callback(finished)
            tasks.append(task)
        else:
            tasks.append(loop.create_task(server.stop(None)))

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    return stopped
