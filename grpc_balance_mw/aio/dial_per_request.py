"""Dial-per-request for ``grpc.aio``: every call on a brand-new connection, retried on a new one.

The same rules as the sync :mod:`grpc_balance_mw.dial_per_request` (see there), with the same retry
policy (:mod:`grpc_balance_mw.retry`, driven by ``tenacity.AsyncRetrying``)::

    channel = dial_per_request_channel(
        "charge-points.ev.svc:50051",
        retry=RetryPolicy(methods={"/chargepoints.v1.ChargePoints/GetChargePoint"}),
        predial=2,
    )
    stub = ChargePointsStub(channel)
    await stub.GetChargePoint(request, timeout=1.0)

Differences from the sync adapter:

- ``predial`` runs as an asyncio task on the loop of the first call, and a connection counts as
  ready on ``channel_ready()`` (no health check, as in the sync adapter: through the observing
  interceptors it would also be counted as a call of the pod). The task dials one connection at
  a time: back to back, about 70 % of calls find one ready. Dialling several at once (a task
  per dial) measured no better here (the handshakes share the loop's one thread), so it stays
  as it is.
- Calls are observed by the affinity core from their done-callbacks (as aio ``observe()``
  observes a channel), by one observer shared by every connection the channel dials.
- The per-call routine is the aio routing core's (:mod:`grpc_balance_mw.aio.routed_channel`):
  a retried unary-response call runs its attempts in a task (``code()``, ``details()`` and
  the metadata are the last attempt's); a retried response stream retries in its first
  ``read()`` (or the first step of ``async for``), until its first message. A unary call sent
  once is the fresh connection's own call; its connection closes when the call is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from grpc_balance_mw._routing import ConnectionRoutes, Lease, Outcome, RedialStats
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.aio.routed_channel import (
    Connectivity,
    RetryingCall,
    RoutedChannel,
    check_interceptors,
    failed_as_error,
    spawn_soon,
)
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observing import ObserveOptions, build_observer, chosen_options
from grpc_balance_mw.retry import NO_RETRY, RetryPolicy, warn_if_native_retry

__all__ = [
    "DialPerRequestChannel",
    "RedialStats",
    "RetryingCall",
    "dial_per_request_channel",
    "failed_as_error",
]

FRESH_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # see grpc_balance_mw.dial_per_request
_PREDIAL_RETRY_S = 0.5


class _Predialler:
    """Keeps up to ``count`` connected channels ready, dialled by one task; a taken one is
    replaced when its call ends, or ``defer_s`` after it was taken (as in the sync adapter:
    dialling beside the call slows the call)."""

    def __init__(
        self, owner: DialPerRequestChannel, count: int, timeout_s: float, defer_s: float
    ) -> None:
        self._owner = owner
        self._timeout_s = timeout_s
        self._defer_s = defer_s
        self._ready: deque[grpc.aio.Channel] = deque()
        self._owed: deque[float] = deque([0.0] * count)  # when each missing one is to be dialled
        self._wake = asyncio.Event()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = self._loop.create_task(self._run())

    def ready(self) -> int:
        return len(self._ready)

    def take(self) -> grpc.aio.Channel | None:
        if not self._ready:
            return None
        self._owed.append(self._loop.time() + self._defer_s)
        self._wake.set()
        return self._ready.popleft()

    def call_ended(self) -> None:
        if self._owed:
            self._owed[0] = 0.0
            self._wake.set()

    async def _due(self) -> bool:
        """Wait until a dial is due (True) or the predialler is closed (False)."""
        while not self._closed:
            now = self._loop.time()
            if self._owed and self._owed[0] <= now:
                self._owed.popleft()
                return True
            self._wake.clear()
            timeout = self._owed[0] - now if self._owed else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
        return False

    async def _run(self) -> None:
        while await self._due():
            channel = self._owner.dial()
            try:
                await asyncio.wait_for(channel.channel_ready(), self._timeout_s)
            except asyncio.TimeoutError:
                await channel.close()
                self._owner.stats.closed += 1
                self._owner.stats.predial_failures += 1
                self._owed.appendleft(self._loop.time() + _PREDIAL_RETRY_S)
                continue
            except asyncio.CancelledError:
                await channel.close()
                self._owner.stats.closed += 1
                raise
            self._ready.append(channel)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        # Dropped once ended: its exception's traceback holds the frame of the channel it was
        # dialling, closed but alive while this channel is (on grpcio < 1.84 a live grpc.aio
        # object keeps grpc.aio's poller thread, and may keep its connection).
        task, self._task = self._task, None
        # asyncio.wait_for can swallow a cancellation that races its inner future's result
        # (CPython gh-86296 before 3.12): cancel until the task has really ended.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
        while self._ready:
            await self._ready.popleft().close()
            self._owner.stats.closed += 1


class DialPerRequestChannel(ConnectionRoutes, RoutedChannel[Lease]):
    """A ``grpc.aio.Channel`` that makes every call on a connection of its own.

    Arguments as for the sync :class:`grpc_balance_mw.dial_per_request.DialPerRequestChannel`, plus
    ``interceptors`` (the user's, for every connection; checked here, as grpc.aio checks
    them); ``sleep`` is awaited. The channel is its own router
    (:class:`~grpc_balance_mw.aio.routed_channel.AioRouter`): each call's pod is observed from
    its done-callback; ``close()`` cancels the calls still running, as grpc.aio's does.
    """

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        *,
        retry: RetryPolicy = NO_RETRY,
        predial: int = 0,
        dial_timeout_s: float = 5.0,
        refill_defer_s: float = 0.005,
        observe: ObserveOptions | bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if predial < 0:
            raise ConfigurationError(f"predial must be >= 0, got {predial}")
        if dial_timeout_s <= 0:
            raise ConfigurationError(f"dial_timeout_s must be > 0, got {dial_timeout_s}")
        self.target = target
        self.retry = retry
        self.sleep = sleep
        self.stats = RedialStats()
        self._credentials = credentials
        self._options = [*(options or ()), FRESH_CONNECTION]
        self._compression = compression
        self._predial = predial
        self._dial_timeout_s = dial_timeout_s
        self._refill_defer_s = refill_defer_s
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._active: set[Lease] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._interceptors = check_interceptors(interceptors)
        self._connectivity = Connectivity(self._dial)
        warn_if_native_retry(self._options, target)
        self._observer: CallObserver | None = None
        chosen = chosen_options(observe)
        if chosen is not None:
            # No probe: every call is a fresh connection, a probe of its own.
            per_call = chosen.but(probe=False, lane=chosen.lane or "dial-per-request")
            self._observer = build_observer(target, per_call, fresh_connections=True)
        self._predialler: _Predialler | None = None
        with contextlib.suppress(RuntimeError):  # no running loop yet: started by the first call
            asyncio.get_running_loop()
            self._start_predial()

    def __repr__(self) -> str:
        s = self.stats
        state = "closed" if self._closed else "open"
        return (
            f"<aio.DialPerRequestChannel {self.target} {state}: {s.dialled} dialled "
            f"({s.predialled} predialled, {self.ready()} ready), {s.closed} closed>"
        )

    def _start_predial(self) -> None:
        if self._predial and self._predialler is None and not self._closed:
            self._predialler = _Predialler(
                self, self._predial, self._dial_timeout_s, self._refill_defer_s
            )

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` in a task kept referenced until it ends."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections -----------------------------------------------------------------------

    def start(self) -> None:
        """Called by every call, on the running loop: the loop the connections belong to."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._start_predial()

    def dial(self) -> grpc.aio.Channel:
        """A new channel on a connection of its own (the hook tests and subclasses override)."""
        self.stats.dialled += 1
        return self._dial()

    def _dial(self) -> grpc.aio.Channel:
        # By keyword: opentelemetry-instrumentation-grpc's aio instrumentor wraps these
        # functions and sets ``interceptors=`` itself, so a positional one is given twice.
        kwargs = {
            "options": self._options,
            "compression": self._compression,
            "interceptors": self._interceptors,
        }
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.target, **kwargs)
        return grpc.aio.secure_channel(self.target, self._credentials, **kwargs)

    def connection(self) -> Lease:
        """The channel for one call: a predialled one if ready, else a new one."""
        if self._closed:
            raise grpc.aio.UsageError("Cannot invoke RPC on closed channel!")
        self._start_predial()
        channel = self._predialler.take() if self._predialler is not None else None
        if channel is None:
            lease = Lease(self.dial(), predialled=False)
        else:
            self.stats.predialled += 1
            lease = Lease(channel, predialled=True)
        self._active.add(lease)
        return lease

    # -- the router -------------------------------------------------------------------------

    def observer(self, lease: Lease) -> CallObserver | None:
        return self._observer

    def release(self, lease: Lease, outcome: Outcome, in_callback: bool) -> None:
        """Close the call's connection, in a task of the channel's (from a done-callback, a
        finalizer or the caller alike)."""
        if lease not in self._active:  # closed by close()
            return
        self._active.discard(lease)
        spawn_soon(self._loop, lambda: self.spawn(self._finish(lease)))

    async def _finish(self, lease: Lease) -> None:
        await lease.channel.close()
        self.stats.closed += 1
        if lease.predialled:
            self.call_ended()

    def call_ended(self) -> None:
        if self._predialler is not None:
            self._predialler.call_ended()

    def ready(self) -> int:
        """Predialled connections connected and waiting for a call."""
        return self._predialler.ready() if self._predialler is not None else 0

    # -- grpc.aio.Channel ------------------------------------------------------------------

    async def close(self, grace: float | None = None) -> None:
        """Close every connection: the calls under way are cancelled (after ``grace``, if
        given, as grpc.aio's ``close``), the predialled ones closed, the predial task stopped."""
        self._closed = True
        active, self._active = self._active, set()
        await asyncio.gather(*(lease.channel.close(grace) for lease in active))
        self.stats.closed += len(active)
        if self._predialler is not None:
            await self._predialler.close()
        if self._tasks:  # connections of finished calls being closed
            await asyncio.wait(list(self._tasks), timeout=grace)
        await self._connectivity.close()

    async def __aenter__(self) -> DialPerRequestChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


#: Made like ``grpc.aio.insecure_channel`` / ``grpc.aio.secure_channel``;
#: the class itself, so that the factory's parameters are the constructor's, typed, and
#: cannot drift from them.
dial_per_request_channel = DialPerRequestChannel
