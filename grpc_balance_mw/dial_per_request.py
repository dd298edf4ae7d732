"""Dial-per-request (sync): every call on a brand-new connection, retried on a new one.

The opt-in fallback for clients that cannot change how their cluster balances: behind a
ClusterIP Service, kube-proxy picks a pod per TCP connection, so a connection per call spreads
calls like a per-request balancer, at the price of a TCP + HTTP/2 (+ TLS) handshake per call.
``predial=N`` keeps N connections dialled ahead of need so the handshake leaves the call's
critical path::

    channel = dial_per_request_channel(
        "charge-points.ev.svc:50051",
        grpc.ssl_channel_credentials(ca),               # the same credentials for every dial
        retry=RetryPolicy(methods={"/chargepoints.v1.ChargePoints/GetChargePoint"}),
        predial=2,
    )
    stub = ChargePointsStub(channel)

Rules:

- Each call gets its own connection (``grpc.use_local_subchannel_pool``: gRPC core would
  otherwise share one subchannel, one TCP connection, between channels with the same target and
  options), closed when the call ends: a unary call after its response; a stream when its
  iterator ends or the call is done or cancelled. A predialled connection serves one call.
- Retries (:class:`~grpc_balance_mw.retry.RetryPolicy`, driven by ``tenacity.Retrying``) only for
  the methods marked idempotent and the codes marked retryable, each attempt on a new
  connection, within the call's ``timeout`` (each attempt gets what is left), and while the retry
  budget allows. Other calls are sent once and fail with their own status.
- A response stream is retried only until its first message arrives: after that, a message
  has reached the caller and sending the call again would repeat it.
- Sent once, never retried: ``future()`` calls, and calls with a request stream unless the
  request is a list or tuple (an iterator is used up by the first attempt).
- Predial: one background thread dials ahead; to dial is to make the channel and ask its core
  to connect, which returns at once, so several handshakes are under way together in gRPC
  core's threads. A call takes the oldest READY connection, else the oldest still connecting;
  one that failed (TRANSIENT_FAILURE) or is not READY within ``dial_timeout_s`` is closed and
  dialled again after a pause. A taken connection is replaced when its call ends, not while
  it runs (dialling beside the call competes with it for the CPU). The same thread closes the
  connections of ended calls. ``close()`` closes the connections dialled ahead and stops the
  thread, and cancels the calls under way by closing their connections, as
  ``grpc.Channel.close`` cancels its calls.
- Connectivity (``subscribe``, ``grpc.channel_ready_future``) is followed on one connection
  of the channel's own, dialled when first asked for: the calls' connections come and go.
- No health check per dial (predial first had one): a ``grpc.health.v1`` RPC on each
  connection cost a Python pod about 0.9 ms of CPU, more than the handshake, and held the
  thread for one round trip per dial. A pod that is NOT_SERVING is not avoided by the client;
  Kubernetes takes it out of the Service's endpoints (its readiness probe), so new
  connections stop reaching it there.
- What predial cannot hide: a dial costs CPU, on the client, the L4 hop and the pod, and with
  every call on a new connection that cost is paid once per call. Measured on a 2-core
  machine (grpcio 1.85, Python pods, ``grpc-balance bench``'s local cluster): a warm call
  costs about 0.8-1.2 ms of CPU in all (client 0.3, pod 0.5-0.6, L4 hop 0.05-0.3); a dial
  (connect to READY, then close) about 1.1-1.5 ms (client 0.6-0.7, pod 0.35-0.45, L4 hop
  0.2-0.55), and 2.5-3.5 ms with the health check it used to have. Calls made back to back on
  2 cores then take at least (0.8 + 1.1) / 2 = 0.95 ms to (1.2 + 1.5) / 2 = 1.35 ms each even
  if both cores were used perfectly, against 0.8-1.0 ms for a warm channel: 1.2x is out of
  reach back to back, whatever the pool. Calls with idle time between them find a READY
  connection and cost about what a warm call costs when the dial and the close of the last
  one are done before the next call (1.0-1.15x at 3.5-5 ms gaps with nothing else running);
  on a busy machine they are not, and the ratio grows (1.35-1.45x at 200 calls/s here).
- Every call is observed by the affinity core (the pod of each attempt goes to the target's
  detector and its span), unless ``observe=False``.
- Thread-safe: one channel serves any number of threads. Connections are closed by the predial
  thread, else in the calling thread, or by a short-lived closer thread when a done-callback
  reports the end (grpcio runs those on the channel's own thread, where ``close()`` can
  deadlock).
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from grpc_balance_mw._grpcio import READY, SHUTDOWN, TRANSIENT_FAILURE, core_channel
from grpc_balance_mw._routing import ConnectionRoutes, Lease, Outcome, RedialStats
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.health_check import NOT_SERVING, check_method
from grpc_balance_mw.observed_methods import ObservedChannel
from grpc_balance_mw.observing import ObserveOptions, build_observer, chosen_options
from grpc_balance_mw.retry import NO_RETRY, RetryPolicy, warn_if_native_retry
from grpc_balance_mw.routed_channel import Connectivity, RoutedChannel

__all__ = ["DialPerRequestChannel", "RedialStats", "dial_per_request_channel"]

_log = logging.getLogger(__name__)

#: Without it, channels with the same target and options share one subchannel (one TCP
#: connection) from gRPC core's global pool, and a "new" channel reuses the old connection.
FRESH_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
_PREDIAL_RETRY_S = 0.5  # after a failed predial, before the next one
_JOIN_S = 5.0


def _observed(channel: grpc.Channel, observer: CallObserver | None) -> grpc.Channel:
    """The one place a fresh connection is put under observation (re-pointed at merge)."""
    return channel if observer is None else ObservedChannel(channel, observer)


class _Closer:
    """Closes connections off grpcio's threads: at most one thread, started when there is work,
    gone when there is none.

    A done-callback runs on the channel's own thread, and ``channel.close()`` waits until the
    channel's calls are cleaned up, which that very thread does: closing there can deadlock.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, close: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(close)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._drain, name=self._name, daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return
                close = self._queue.popleft()
            close()

    def idle(self) -> bool:
        with self._lock:
            return not self._running


def connect(channel: grpc.Channel, timeout_s: float) -> bool:
    """Connect a fresh channel with one ``grpc.health.v1`` check; True if it reached a server
    that is not NOT_SERVING (a server without the health service answers UNIMPLEMENTED, which
    proves the connection as well). Predial's way for a channel whose core it cannot find
    (:func:`core_channel`), e.g. one a :meth:`DialPerRequestChannel.dial` override returns.

    Not ``grpc.channel_ready_future``: its connectivity-polling thread can leave
    ``channel.close()`` waiting (grpcio, "we'd rather not poll", grpc/grpc#3064); a call does not.
    """
    try:
        status = check_method(channel)("", timeout=timeout_s, wait_for_ready=True)
    except grpc.RpcError as error:
        return error.code() not in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.CANCELLED,
        )
    return bool(status != NOT_SERVING)


#: ``grpc_connectivity_state``, as a core channel reports it (see :func:`core_channel`).
_READY, _TRANSIENT_FAILURE, _SHUTDOWN = READY, TRANSIENT_FAILURE, SHUTDOWN


class _Dialled:
    """A connection dialled ahead: its channel, the core that says its state, when it was
    dialled."""

    __slots__ = ("channel", "core", "dialled_at")

    def __init__(self, channel: grpc.Channel, core: Any, dialled_at: float) -> None:
        self.channel = channel
        self.core = core
        self.dialled_at = dialled_at

    def state(self) -> int:
        if self.core is None:  # connected by a health check
            return _READY
        try:
            return int(self.core.check_connectivity_state(False))
        except ValueError:  # closed
            return _SHUTDOWN


class _Predialler:
    """Keeps ``count`` connections dialled ahead of need, for one background thread to dial.

    To dial is to make the channel and ask its core to connect, which returns at once: several
    handshakes are under way together, in gRPC core's threads, while this one waits for the
    next dial that is due. A call takes the oldest READY connection, else the oldest still
    connecting (its handshake is under way: sooner done than one started in the call). A
    connection that failed (TRANSIENT_FAILURE) or is not READY within ``timeout_s`` is closed
    and dialled again after a pause. The thread also closes the connections of ended calls,
    off the callers' critical path.

    A taken connection is replaced when its call ends, or ``defer_s`` after it was taken if
    the call lasts longer: dialling while the call runs would compete with it for the CPU.
    """

    def __init__(
        self, owner: DialPerRequestChannel, count: int, timeout_s: float, defer_s: float
    ) -> None:
        self._owner = owner
        self._timeout_s = timeout_s
        self._defer_s = defer_s
        self._pool: deque[_Dialled] = deque()  # oldest first
        self._owed: list[float] = [0.0] * count  # sorted: when each missing one is due
        self._closing: list[grpc.Channel] = []
        self._cond = threading.Condition()
        self._closed = False
        self._dialling: grpc.Channel | None = None  # closed by close() to cut a check short
        self._thread = threading.Thread(
            target=self._run, name=f"grpc-balance-predial-{owner.target}", daemon=True
        )
        self._thread.start()

    def ready(self) -> int:
        with self._cond:
            return sum(dialled.state() == _READY for dialled in self._pool)

    def take(self) -> grpc.Channel | None:
        """A connection dialled ahead if there is one; its replacement is owed."""
        with self._cond:
            chosen: _Dialled | None = None
            for dialled in list(self._pool):
                state = dialled.state()
                if state == _READY:
                    chosen = dialled
                    break
                if state in (_TRANSIENT_FAILURE, _SHUTDOWN):
                    self._failed(dialled)
                elif chosen is None:
                    chosen = dialled
            if chosen is None:
                return None
            self._pool.remove(chosen)
            bisect.insort(self._owed, time.monotonic() + self._defer_s)
            return chosen.channel

    def finished(self, channel: grpc.Channel, predialled: bool) -> bool:
        """A call's connection to close (False: closed predialler, close it yourself); a
        predialled one's replacement is dialled now."""
        with self._cond:
            if self._closed:
                return False
            self._closing.append(channel)
            now = time.monotonic()
            # the earliest deferred replacement, not a failed dial's pause
            if predialled and self._owed and self._owed[0] - now <= self._defer_s:
                self._owed[0] = now
            self._cond.notify_all()
            return True

    def _failed(self, dialled: _Dialled) -> None:
        """Under the lock: close a failed dial and dial again after a pause."""
        self._pool.remove(dialled)
        self._closing.append(dialled.channel)
        self._owner.count_predial_failure()
        bisect.insort(self._owed, time.monotonic() + _PREDIAL_RETRY_S)

    def _work(self) -> tuple[int, list[grpc.Channel]] | None:
        """Wait until there is work: dials due and connections to close (None: closed)."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                wake = self._owed[0] if self._owed else math.inf
                for dialled in list(self._pool):
                    expires = dialled.dialled_at + self._timeout_s
                    if expires > now:
                        wake = min(wake, expires)
                    elif dialled.state() == _READY:
                        dialled.dialled_at = math.inf  # connected: it never expires
                    else:
                        self._failed(dialled)
                        wake = min(wake, self._owed[0])
                due = bisect.bisect_right(self._owed, now)
                if due or self._closing:
                    del self._owed[:due]
                    closing, self._closing = self._closing, []
                    return due, closing
                self._cond.wait(None if wake == math.inf else wake - now)
            return None

    def _run(self) -> None:
        while (work := self._work()) is not None:
            dials, closing = work
            for _ in range(dials):
                self._dial()
            for channel in closing:
                channel.close()
                self._owner.count_closed()

    def _dial(self) -> None:
        channel = self._owner.dial()
        core = core_channel(channel)
        if core is not None:
            core.check_connectivity_state(True)  # start connecting; returns at once
            connected = True
        else:  # no core to ask: connected by a health check, one at a time
            with self._cond:
                closed = self._closed
                self._dialling = channel
            try:
                connected = not closed and connect(channel, self._timeout_s)
            except ValueError:  # closed by close() before the check began
                connected = False
        with self._cond:
            self._dialling = None
            if not self._closed:
                if connected:
                    self._pool.append(_Dialled(channel, core, time.monotonic()))
                    return
                self._owner.count_predial_failure()
                bisect.insort(self._owed, time.monotonic() + _PREDIAL_RETRY_S)
                self._closing.append(channel)
                return
        channel.close()
        self._owner.count_closed()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            closing = [dialled.channel for dialled in self._pool] + self._closing
            self._pool.clear()
            self._closing = []
            dialling = self._dialling
            self._cond.notify_all()
        if dialling is not None:
            dialling.close()  # its health check ends CANCELLED; the thread then closes it (again)
        for channel in closing:
            channel.close()
            self._owner.count_closed()
        # A health check in progress ends within its timeout; the thread closes what it dialled.
        self._thread.join(self._timeout_s + _JOIN_S)


class DialPerRequestChannel(ConnectionRoutes, RoutedChannel[Lease]):
    """A ``grpc.Channel`` that makes every call on a connection of its own; see the module doc.

    Args:
        target: where to dial, as for ``grpc.insecure_channel``.
        credentials: ``grpc.ChannelCredentials`` for every connection (None: plaintext).
        options: channel options for every connection (``grpc.use_local_subchannel_pool`` is
            added).
        compression: the default compression of every connection.
        retry: which calls are retried and how; default: none.
        predial: connections to keep dialled ahead of need (0: dial in the call).
        dial_timeout_s: how long a predial may take to connect.
        refill_defer_s: how long after a predialled connection is taken its replacement is
            dialled if the call has not ended by then (it is dialled when the call ends).
        observe: feed the target's affinity detector (and telemetry) with every call's pod:
            True with the default :class:`ObserveOptions`, or the options to use; False: not.
        sleep: how retries sleep (tests inject one).

    The channel is its own router (:class:`~grpc_balance_mw.routed_channel.SyncRouter`): each
    route is a connection of its own, closed when its call ends, or by ``close()``, which
    cancels the calls still running on them as ``grpc.Channel.close`` does.
    """

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        compression: grpc.Compression | None = None,
        *,
        retry: RetryPolicy = NO_RETRY,
        predial: int = 0,
        dial_timeout_s: float = 5.0,
        refill_defer_s: float = 0.005,
        observe: ObserveOptions | bool = True,
        sleep: Callable[[float], None] = time.sleep,
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
        self._lock = threading.Lock()
        self._closed = False
        self._active: set[Lease] = set()
        self._connectivity = Connectivity(self._dial)
        self.closer = _Closer(f"grpc-balance-close-{target}")
        warn_if_native_retry(self._options, target)
        self.observer: CallObserver | None = None
        chosen = chosen_options(observe)
        if chosen is not None:
            # No probe: every call is a fresh connection, a probe of its own.
            self.observer = build_observer(
                target,
                chosen.but(probe=False, lane=chosen.lane or "dial-per-request"),
                fresh_connections=True,
            )
        self._predialler = (
            _Predialler(self, predial, dial_timeout_s, refill_defer_s) if predial else None
        )

    def __repr__(self) -> str:
        s = self.stats
        state = "closed" if self._closed else "open"
        ready = self._predialler.ready() if self._predialler is not None else 0
        return (
            f"<DialPerRequestChannel {self.target} {state}: {s.dialled} dialled "
            f"({s.predialled} predialled, {ready} ready), {s.closed} closed>"
        )

    # -- connections -----------------------------------------------------------------------

    def dial(self) -> grpc.Channel:
        """A new channel on a connection of its own (the hook tests and subclasses override)."""
        with self._lock:
            self.stats.dialled += 1
        return self._dial()

    def _dial(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.target, self._options, self._compression)
        return grpc.secure_channel(self.target, self._credentials, self._options, self._compression)

    def connection(self) -> Lease:
        """The (observed) channel for one call: a predialled one if ready, else a new one."""
        if self._closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        channel = self._predialler.take() if self._predialler is not None else None
        if channel is None:
            lease = Lease(_observed(self.dial(), self.observer), predialled=False)
        else:
            lease = Lease(_observed(channel, self.observer), predialled=True)
        with self._lock:
            self.stats.predialled += lease.predialled
            if self._closed:  # closed meanwhile: close() did not see this one
                closed = True
            else:
                closed = False
                self._active.add(lease)
        if closed:
            self.finished(lease.channel, lease.predialled)
            raise ValueError("Cannot invoke RPC on closed channel!")
        return lease

    # -- the router -------------------------------------------------------------------------

    def release(self, lease: Lease, outcome: Outcome, in_callback: bool) -> None:
        """Close the call's connection: by the predial thread if there is one, else here, or,
        from a done-callback (grpcio's thread, where ``close()`` can deadlock), by the closer
        thread."""
        with self._lock:
            if lease not in self._active:  # closed by close()
                return
            self._active.discard(lease)
        if in_callback:
            self.closer.submit(lambda: self.finished(lease.channel, lease.predialled))
        else:
            self.finished(lease.channel, lease.predialled)

    def finished(self, channel: grpc.Channel, predialled: bool) -> None:
        """A call's connection is done with: closed now, or by the predial thread."""
        if self._predialler is None or not self._predialler.finished(channel, predialled):
            channel.close()
            self.count_closed()

    def count_closed(self) -> None:
        with self._lock:
            self.stats.closed += 1

    def count_predial_failure(self) -> None:
        with self._lock:
            self.stats.predial_failures += 1

    def ready(self) -> int:
        """Predialled connections connected and waiting for a call."""
        return self._predialler.ready() if self._predialler is not None else 0

    # -- grpc.Channel ----------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection: the calls under way are cancelled (as ``grpc.Channel.close``
        cancels its calls), the predialled ones closed, the predial thread stopped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            active, self._active = self._active, set()
        for lease in active:
            lease.channel.close()
            self.count_closed()
        if self._predialler is not None:
            self._predialler.close()
        self._connectivity.close()

    def __enter__(self) -> DialPerRequestChannel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


#: Made like ``grpc.insecure_channel`` / ``grpc.secure_channel``;
#: the class itself, so that the factory's parameters are the constructor's, typed, and
#: cannot drift from them.
dial_per_request_channel = DialPerRequestChannel
