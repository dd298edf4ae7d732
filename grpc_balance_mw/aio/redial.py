"""Dial-per-request for ``grpc.aio``: every call on a brand-new connection, retried on a new one.

The same rules as the sync :mod:`grpc_balance_mw.redial` (see there), with the same retry
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
- Calls are observed by the affinity core through
  :class:`~grpc_balance_mw.aio.client.AffinityInterceptors`'s interceptors, one set per channel
  shared by every connection it dials.
- A retried unary-response call runs its attempts in a task; ``code()``, ``details()`` and the
  metadata are the last attempt's. A retried response stream retries in its first ``read()``
  (or the first step of ``async for``), until its first message. A call sent once is the
  fresh connection's own call, wrapped so that the connection closes when the call is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any

import grpc

from grpc_balance_mw.aio.client import AffinityInterceptors
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observing import ObserveOptions, build_observer, chosen_options
from grpc_balance_mw.retry import (
    NO_RETRY,
    Deadline,
    RetryPolicy,
    acall_with_retries,
    code_of,
    warn_if_native_retry,
)

__all__ = ["DialPerRequestChannel", "RetryingCall", "dial_per_request_channel", "failed_as_error"]

FRESH_CONNECTION = ("grpc.use_local_subchannel_pool", 1)  # see grpc_balance_mw.redial
_PREDIAL_RETRY_S = 0.5


class _Lease:
    """One call's connection; closed once, however many ends of the call report it."""

    def __init__(
        self, owner: DialPerRequestChannel, channel: grpc.aio.Channel, predialled: bool
    ) -> None:
        self.owner = owner
        self.channel = channel
        self.predialled = predialled
        self._released = False

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        await self.channel.close()
        self.owner.stats["closed"] += 1
        if self.predialled:
            self.owner.call_ended()

    def release_soon(self, _call: object = None) -> None:
        """For done-callbacks: close in a task of the channel's (kept until it ends)."""
        if not self._released:
            self.owner.spawn(self.release())


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
                self._owner.stats["closed"] += 1
                self._owner.stats["predial_failures"] += 1
                self._owed.appendleft(self._loop.time() + _PREDIAL_RETRY_S)
                continue
            except asyncio.CancelledError:
                await channel.close()
                self._owner.stats["closed"] += 1
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
            self._owner.stats["closed"] += 1


class _SingleCall:
    """A call sent once: the fresh connection's own call; the connection closes when it is done
    (or when its responses have been read to the end)."""

    def __init__(self, call: Any, lease: _Lease) -> None:
        self._call = call
        self._lease = lease
        call.add_done_callback(lease.release_soon)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._call.__await__()  # type: ignore[no-any-return]

    async def _responses(self) -> AsyncIterator[Any]:
        try:
            async for response in self._call:
                yield response
        finally:
            await self._lease.release()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def read(self) -> Any:
        response = await self._call.read()
        if response is grpc.aio.EOF:
            await self._lease.release()
        return response

    def __getattr__(self, name: str) -> Any:
        # write, done_writing, code, details, metadata, cancel, done, ...: the call's own.
        return getattr(self._call, name)


async def failed_as_error(call: Any, response: Any) -> Any:
    """``response`` of a stream's first ``read()``, or the call's error if that read ended the
    stream with a failure: an intercepted grpc.aio stream can end a failed read with EOF and
    leave the status in ``code()``, which a retry would otherwise take for an empty stream."""
    if response is not grpc.aio.EOF:
        return response
    code = await call.code()
    if code is grpc.StatusCode.OK:
        return response
    raise grpc.aio.AioRpcError(
        code,
        await call.initial_metadata() or grpc.aio.Metadata(),
        await call.trailing_metadata() or grpc.aio.Metadata(),
        await call.details(),
    )


class _RetryingStream:
    """A response stream sent again, on a new connection, when it fails before its first
    message (nothing has reached the caller yet); after that, a failure is the caller's. The
    first attempt starts at once; the retries happen in the first ``read()``."""

    def __init__(
        self,
        start: Callable[[], tuple[Any, _Lease]],
        policy: RetryPolicy,
        deadline: Deadline,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._start = start
        self._policy = policy
        self._deadline = deadline
        self._sleep = sleep
        self._committed = False
        self._call, self._lease = start()
        self._call.add_done_callback(self._lease.release_soon)

    async def _read_once(self) -> Any:
        try:
            response = await self._call.read()
            if not self._committed:
                response = await failed_as_error(self._call, response)
        except StopAsyncIteration:
            # grpcio before 1.6x: an intercepted stream that failed ends its reads this way,
            # not with the error; raise the error the caller is owed.
            await self._lease.release()
            code = await self._call.code()
            if code is grpc.StatusCode.OK:
                return grpc.aio.EOF
            raise grpc.aio.AioRpcError(
                code,
                await self._call.initial_metadata(),
                await self._call.trailing_metadata(),
                await self._call.details(),
            ) from None
        except grpc.aio.AioRpcError:
            await self._lease.release()
            raise
        if response is grpc.aio.EOF:
            await self._lease.release()
        return response

    async def read(self) -> Any:
        if self._committed:
            return await self._read_once()
        first = True

        async def attempt() -> Any:
            nonlocal first
            if not first:
                self._call, self._lease = self._start()
                self._call.add_done_callback(self._lease.release_soon)
            first = False
            return await self._read_once()

        try:
            return await acall_with_retries(self._policy, self._deadline, attempt, self._sleep)
        finally:
            self._committed = True

    async def _responses(self) -> AsyncIterator[Any]:
        try:
            while (response := await self.read()) is not grpc.aio.EOF:
                yield response
        finally:
            await self._lease.release()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    def __getattr__(self, name: str) -> Any:
        # write, done_writing, code, details, metadata, cancel, done, ...: the attempt's own.
        return getattr(self._call, name)


class RetryingCall:
    """A retried unary-response call: its attempts run in a task, each on a new connection (or,
    in the balanced channel, another lane); ``code()``, ``details()`` and the metadata are the
    last attempt's."""

    def __init__(self, run: Callable[[RetryingCall], Coroutine[Any, Any, Any]]) -> None:
        self.last: Any = None  # the current (last) attempt's call
        self._callbacks: list[Callable[[Any], None]] = []
        self._task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(run(self))
        self._task.add_done_callback(self._done)

    def _done(self, _task: object) -> None:
        for callback in self._callbacks:
            callback(self)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._task.__await__()

    async def _settled(self) -> Any:
        await asyncio.wait([self._task])
        return self.last

    async def code(self) -> grpc.StatusCode:
        last = await self._settled()
        if self._task.cancelled():
            return grpc.StatusCode.CANCELLED
        if last is None:  # no attempt got a call (e.g. no connection): the error says why
            return code_of(self._task.exception()) or grpc.StatusCode.UNKNOWN
        return await last.code()

    async def details(self) -> str | None:
        last = await self._settled()
        if last is None:
            error = None if self._task.cancelled() else self._task.exception()
            return None if error is None else str(getattr(error, "details", lambda: error)())
        details: str | None = await last.details()
        return details

    async def initial_metadata(self) -> Any:
        last = await self._settled()
        return None if last is None else await last.initial_metadata()

    async def trailing_metadata(self) -> Any:
        last = await self._settled()
        return None if last is None else await last.trailing_metadata()

    async def wait_for_connection(self) -> None:
        while self.last is None and not self._task.done():
            await asyncio.sleep(0)
        if self.last is not None:
            await self.last.wait_for_connection()

    def cancel(self) -> bool:
        return self._task.cancel()

    def cancelled(self) -> bool:
        return self._task.cancelled()

    def done(self) -> bool:
        return self._task.done()

    def time_remaining(self) -> float | None:
        return None if self.last is None else self.last.time_remaining()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._task.done():
            callback(self)
        else:
            self._callbacks.append(callback)


class _Method:
    """One method of the channel; each call (each attempt) on a connection of its own."""

    def __init__(
        self,
        owner: DialPerRequestChannel,
        kind: str,
        method: str,
        request_serializer: Any,
        response_deserializer: Any,
        registered: bool,
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._serializer = request_serializer
        self._deserializer = response_deserializer
        self._registered = registered

    def _start(self, lease: _Lease, request: Any, timeout: float | None, kwargs: Any) -> Any:
        make = getattr(lease.channel, self._kind)
        if self._registered:
            multicallable = make(
                self._method, self._serializer, self._deserializer, _registered_method=True
            )
        else:
            multicallable = make(self._method, self._serializer, self._deserializer)
        return multicallable(request, timeout=timeout, **kwargs)

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Any:
        owner = self._owner
        policy = owner.retry
        policy.record_call()
        kwargs = {
            "metadata": metadata,
            "credentials": credentials,
            "wait_for_ready": wait_for_ready,
            "compression": compression,
        }
        streaming = self._kind.startswith("stream")
        retryable = policy.retryable(self._method, request, streaming=streaming)
        deadline = Deadline(timeout)

        def start() -> tuple[Any, _Lease]:
            lease = owner.connection()
            try:
                return self._start(lease, request, deadline.remaining(), kwargs), lease
            except BaseException:
                lease.release_soon()
                raise

        if not retryable:
            return _SingleCall(*start())
        if not self._kind.endswith("unary"):
            return _RetryingStream(start, policy, deadline, owner.sleep)

        async def run(holder: RetryingCall) -> Any:
            async def attempt() -> Any:
                lease = owner.connection()
                try:
                    holder.last = self._start(lease, request, deadline.remaining(), kwargs)
                    return await holder.last
                finally:
                    await lease.release()

            return await acall_with_retries(policy, deadline, attempt, owner.sleep)

        return RetryingCall(run)


class _UnaryUnary(_Method, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _UnaryStream(_Method, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    pass


class _StreamUnary(_Method, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _StreamStream(_Method, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    pass


class DialPerRequestChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A ``grpc.aio.Channel`` that makes every call on a connection of its own.

    Arguments as for the sync :class:`grpc_balance_mw.redial.DialPerRequestChannel`, plus
    ``interceptors`` (for every connection, after the observing ones); ``sleep`` is awaited.
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
        self.stats = {"dialled": 0, "predialled": 0, "predial_failures": 0, "closed": 0}
        self._credentials = credentials
        self._options = [*(options or ()), FRESH_CONNECTION]
        self._compression = compression
        self._predial = predial
        self._dial_timeout_s = dial_timeout_s
        self._refill_defer_s = refill_defer_s
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        warn_if_native_retry(self._options, target)
        self.affinity: AffinityInterceptors | None = None
        chain: list[grpc.aio.ClientInterceptor] = []
        chosen = chosen_options(observe)
        if chosen is not None:
            per_call = chosen.but(probe=False, lane=chosen.lane or "dial-per-request")
            self.affinity = AffinityInterceptors(
                target, observer=build_observer(target, per_call, fresh_connections=True)
            )
            chain.extend(self.affinity.interceptors)
        chain.extend(interceptors or ())
        self._interceptors = chain
        self._predialler: _Predialler | None = None
        with contextlib.suppress(RuntimeError):  # no running loop yet: started by the first call
            asyncio.get_running_loop()
            self._start_predial()

    def __repr__(self) -> str:
        s = self.stats
        state = "closed" if self._closed else "open"
        return (
            f"<aio.DialPerRequestChannel {self.target} {state}: {s['dialled']} dialled "
            f"({s['predialled']} predialled, {self.ready()} ready), {s['closed']} closed>"
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

    def dial(self) -> grpc.aio.Channel:
        """A new channel on a connection of its own (the hook tests and subclasses override)."""
        self.stats["dialled"] += 1
        if self._credentials is None:
            return grpc.aio.insecure_channel(
                self.target, self._options, self._compression, self._interceptors
            )
        return grpc.aio.secure_channel(
            self.target, self._credentials, self._options, self._compression, self._interceptors
        )

    def connection(self) -> _Lease:
        """The channel for one call: a predialled one if ready, else a new one."""
        if self._closed:
            raise grpc.aio.UsageError("Cannot invoke RPC on closed channel!")
        self._start_predial()
        channel = self._predialler.take() if self._predialler is not None else None
        if channel is None:
            return _Lease(self, self.dial(), predialled=False)
        self.stats["predialled"] += 1
        return _Lease(self, channel, predialled=True)

    def call_ended(self) -> None:
        if self._predialler is not None:
            self._predialler.call_ended()

    def ready(self) -> int:
        """Predialled connections connected and waiting for a call."""
        return self._predialler.ready() if self._predialler is not None else 0

    # -- grpc.aio.Channel ------------------------------------------------------------------

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable:
        return _UnaryUnary(
            self, "unary_unary", method, request_serializer, response_deserializer,
            bool(_registered_method),
        )  # fmt: skip

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable:
        return _UnaryStream(
            self, "unary_stream", method, request_serializer, response_deserializer,
            bool(_registered_method),
        )  # fmt: skip

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamUnaryMultiCallable:
        return _StreamUnary(
            self, "stream_unary", method, request_serializer, response_deserializer,
            bool(_registered_method),
        )  # fmt: skip

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.StreamStreamMultiCallable:
        return _StreamStream(
            self, "stream_stream", method, request_serializer, response_deserializer,
            bool(_registered_method),
        )  # fmt: skip

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY while a predialled connection waits, else IDLE (no connection between calls)."""
        return grpc.ChannelConnectivity.READY if self.ready() else grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        while self.get_state() == last_observed_state and not self._closed:
            await asyncio.sleep(0.05)

    async def channel_ready(self) -> None:
        """Returns when a predialled connection is ready; at once without predial (each call
        dials its own)."""
        self._start_predial()
        while self._predialler is not None and not self.ready() and not self._closed:
            await asyncio.sleep(0.005)

    async def close(self, grace: float | None = None) -> None:
        """Close the predialled connections and stop the predial task; calls under way finish
        on their own connections (within ``grace``, if given, as grpc.aio does)."""
        self._closed = True
        if self._predialler is not None:
            await self._predialler.close()
        if self._tasks:  # connections of finished calls being closed; ``grace`` bounds the wait
            await asyncio.wait(list(self._tasks), timeout=grace)
        if self.affinity is not None:
            await self.affinity.settle()

    async def __aenter__(self) -> DialPerRequestChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


def dial_per_request_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    **kwargs: Any,
) -> DialPerRequestChannel:
    """Made like ``grpc.aio.insecure_channel`` / ``grpc.aio.secure_channel``."""
    return DialPerRequestChannel(target, credentials, options, compression, interceptors, **kwargs)
