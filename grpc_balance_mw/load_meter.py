"""What a pod knows of its own load, kept per call, for the ORCA report in every call's trailer.

The server interceptor (:class:`grpc_balance_mw.server.PodIdentityInterceptor` and its aio twin,
given ``load_meter=``) calls :meth:`LoadMeter.start` when a call's handler starts and
:meth:`LoadMeter.end` when it ends; ``end`` returns the :class:`~grpc_balance_mw.orca.LoadReport`
that goes out in the call's ``endpoint-load-metrics-bin`` trailer (gRFC A51). Plain Python, no
grpc: tested with fake clocks.

What a report says:

- ``application_utilization``: the mean number of calls in flight over the last ``window_s``,
  divided by ``capacity`` (the calls the pod serves at once: its executor's ``max_workers``, its
  concurrency limit), when one is given; or what the application sets itself
  (:meth:`LoadMeter.set_application_utilization`, or a callable), which wins. A time average and
  not the count at the moment of the report: by Little's law it is offered rate x service time, so
  a pod that serves at half speed reports twice the figure under the same load, and a client that
  weighs lanes by ``rps / utilization`` (gRFC A58) gets ``capacity / service time``, the rate the
  pod can take, instead of a count that is 0 between bursts. Calls a pod queues inside its handler
  count, so it goes above 1.0 when the pod queues.
- ``cpu_utilization``: the process's CPU time over wall time, divided by the CPUs it may run on,
  measured over at least ``cpu_window_s`` and cached in between (one ``time.process_time()`` per
  refresh, not per call). What A58 weighs by when there is no application figure.
- ``rps_fractional`` and ``eps``: calls (and calls that failed) ended per second over the window.
- ``named_metrics``: ``in_flight``, the calls in flight once this one ended; ``connections``, the
  client connections that carried a call, or a third health check, within ``peer_window_s`` (a
  connection checked once and closed is a client's scout looking for pods, not a connection it
  keeps: with scouts several a second they would outnumber the kept ones many times; a balanced
  channel checks a connection to a pod new to it twice at once, to confirm its name, which at
  its start is every connection it dials, the duplicates it then closes included: counted from
  the second check, 8 clients' 32 lanes over 6 pods were reported as 52 to 57 connections for
  the first 12 s of a run). grpcio's Python server does not expose its connections, so they are
  counted as distinct ``context.peer()`` addresses (each client connection has its own source
  address and port, also behind kube-proxy's DNAT): a connection that stayed idle longer than
  the window is not counted, and a client that reconnected counts twice until its old address
  ages out. ``peer()`` is cheap next to a call (well under a microsecond: grpc core holds the
  address already).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from types import MappingProxyType

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.orca import LoadReport

__all__ = ["LoadMeter"]

_log = logging.getLogger(__name__)

Capacity = int | Callable[[], int] | None
ApplicationUtilization = float | Callable[[], float] | None

_BUCKETS = 4  # the window in this many buckets, plus the one filling now

#: A connection that carries only health checks counts from this many: a client's scout checks
#: once, and a balanced channel confirms a pod's name new to it with a second check at once; a
#: lane is checked every few seconds (5 by default), so it counts from its third check.
CHECKS_COUNTED = 3

#: The report of :meth:`LoadMeter.end_encoded`, in one ``struct.pack``: OrcaLoadReport's
#: cpu_utilization (1), application_utilization (9), rps_fractional (6) and eps (7), doubles, and
#: two named_metrics (8) entries. Fields at 0 are sent anyway (protobuf 3 parsers read an explicit
#: 0 as the default), so the layout never changes; ``test_load_meter`` checks it against
#: :func:`~grpc_balance_mw.orca.decode_load_report`.
_WIRE = struct.Struct("<" + "Bd" * 4 + "BB" + "BB9sBd" + "BB" + "BB11sBd")
_WIRE_KEYS = (0x09, 0x49, 0x31, 0x39)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Bucket:
    __slots__ = ("busy", "calls", "errors", "index")

    def __init__(self) -> None:
        self.index = -1
        self.calls = 0
        self.errors = 0
        self.busy = 0.0  # calls in flight x seconds


class LoadMeter:
    """Calls in flight, their rate and the pod's utilization, for the ORCA report of each call.

    Safe to share between the threads of a sync server and to use from an aio server's loop (one
    uncontended lock per call start and end).

    Args:
        capacity: the calls this pod serves at once (an int, or a callable read at each report,
            for a limit that changes); None: utilization is the CPU's.
        application_utilization: a figure (or a callable giving one at each report) that replaces
            the one from ``capacity``; see :meth:`set_application_utilization`.
        window_s: the span that rates and the mean in flight are taken over (in four buckets,
            plus the one filling now: between ``window_s`` and 1.25 times that).
        peer_window_s: a client connection counts while it carried a call or a health check
            within this span, once it carried a call or ``CHECKS_COUNTED`` health checks; a
            connection closed counts until its last call is this old (grpcio does not tell a
            server a connection closed). 5 s: a lane of a client that calls counts at once and
            stops counting 5 to 6 s after it went; a lane only checked (every 5 s by default)
            brings no load and is not counted. With 10 s, the clients of 32 lanes over 6 pods,
            moving as the subset rule says, estimated the mean at 5.5 to 6.2 where it was 5.3,
            and lanes left pods whose excess had already gone.
        cpu_window_s: the CPU figure is measured over at least this span.
        clock, cpu_clock: wall and process-CPU clocks (tests pass fakes).
        cpus: the CPUs the process may run on (default: its affinity mask).
    """

    def __init__(
        self,
        capacity: Capacity = None,
        *,
        application_utilization: ApplicationUtilization = None,
        window_s: float = 2.0,
        peer_window_s: float = 5.0,
        cpu_window_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        cpus: int | None = None,
    ) -> None:
        if isinstance(capacity, int) and capacity <= 0:
            raise ConfigurationError(f"capacity must be > 0 calls, got {capacity}")
        if window_s <= 0 or peer_window_s <= 0 or cpu_window_s <= 0:
            raise ConfigurationError("window_s, peer_window_s and cpu_window_s must be > 0")
        self._capacity = capacity
        self._application = application_utilization
        self._width = window_s / _BUCKETS
        self._peer_window_s = peer_window_s
        self._cpu_window_s = cpu_window_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._cpus = cpus if cpus is not None else _cpus()
        self._lock = threading.Lock()
        self._buckets = [_Bucket() for _ in range(_BUCKETS + 1)]
        self._in_flight = 0
        now = clock()
        self._born = now
        self._last_event = now
        self._peers: dict[str, float] = {}
        #: connections with fewer than CHECKS_COUNTED health checks: (checks, last seen)
        self._checked: dict[str, tuple[int, float]] = {}
        self._peers_pruned = now
        self._cpu_at = (now, cpu_clock())
        self._cpu_utilization = 0.0

    def __repr__(self) -> str:
        return f"LoadMeter({self._in_flight} in flight, capacity {self._capacity_now()})"

    @property
    def in_flight(self) -> int:
        """Calls started and not yet ended."""
        return self._in_flight

    def set_application_utilization(self, value: ApplicationUtilization) -> None:
        """Report ``value`` (or what the callable gives at each report) as the application's
        utilization instead of the one from ``capacity``; None goes back to it."""
        if isinstance(value, int | float) and not (math.isfinite(value) and value >= 0):
            raise ConfigurationError(f"utilization must be a finite number >= 0, got {value}")
        self._application = value

    def start(self, peer: str | None = None) -> None:
        """A call began (``peer``: its ``context.peer()``, counted as a connection)."""
        now = self._clock()
        with self._lock:
            self._advance(now)
            self._in_flight += 1
            if peer:
                self._peers[peer] = now
                self._checked.pop(peer, None)

    def touch(self, peer: str | None) -> None:
        """A call that is not load (a health check) came on ``peer``'s connection: it counts
        from its ``CHECKS_COUNTED``-th (a scout's one check and close, or a new name's check and
        confirmation, is no connection kept)."""
        if peer:
            now = self._clock()
            with self._lock:
                if peer in self._peers:
                    self._peers[peer] = now
                    return
                checks = self._checked.pop(peer, (0, now))[0] + 1
                if checks >= CHECKS_COUNTED:
                    self._peers[peer] = now
                else:
                    self._checked[peer] = (checks, now)

    def end(self, failed: bool = False) -> LoadReport:
        """A call ended (``failed``: with a status other than OK); the report for its trailer."""
        return _report(*self._end(failed))

    def end_encoded(self, failed: bool = False) -> bytes:
        """:meth:`end`, the report in its wire form (what the interceptor sends: cheaper than
        building a :class:`~grpc_balance_mw.orca.LoadReport` and encoding it)."""
        return _encoded(*self._end(failed))

    def report(self) -> LoadReport:
        """The report as of now, for a call that is not counted (a health check)."""
        return _report(*self._figures())

    def report_encoded(self) -> bytes:
        """:meth:`report` in its wire form."""
        return _encoded(*self._figures())

    def _end(self, failed: bool) -> tuple[float, float, float, float, float, float]:
        now = self._clock()
        with self._lock:
            bucket = self._advance(now)
            self._in_flight -= 1
            bucket.calls += 1
            bucket.errors += failed
            return self._figures_at(now)

    def _figures(self) -> tuple[float, float, float, float, float, float]:
        now = self._clock()
        with self._lock:
            self._advance(now)
            return self._figures_at(now)

    def _advance(self, now: float) -> _Bucket:
        """The bucket of ``now``; the calls in flight since the last event are added to the
        buckets that time fell in (those still in the window)."""
        width, index = self._width, int(now / self._width)
        last = self._last_event
        step = max(int(last / width), index - _BUCKETS)
        last = max(last, step * width)  # time before the window is forgotten
        while True:
            bucket = self._buckets[step % len(self._buckets)]
            if bucket.index != step:
                bucket.index, bucket.calls, bucket.errors, bucket.busy = step, 0, 0, 0.0
            if step == index:
                break
            end = (step + 1) * width
            bucket.busy += self._in_flight * max(0.0, end - last)
            last = max(last, end)
            step += 1
        bucket.busy += self._in_flight * max(0.0, now - last)
        self._last_event = now
        return bucket

    def _figures_at(self, now: float) -> tuple[float, float, float, float, float, float]:
        """cpu, application utilization, rps, eps, in flight, connections."""
        index = int(now / self._width)
        calls = errors = 0
        busy = 0.0
        for bucket in self._buckets:
            if index - bucket.index <= _BUCKETS:
                calls += bucket.calls
                errors += bucket.errors
                busy += bucket.busy
        # The window: the full buckets and the part of the current one, or the meter's life
        # (at least one bucket, so a young meter's first call is not a rate of thousands).
        span = max(min(now - (index - _BUCKETS) * self._width, now - self._born), self._width)
        return (
            self._cpu(now),
            self._application_utilization(busy / span),
            calls / span,
            errors / span,
            float(self._in_flight),
            float(self._connections(now)),
        )

    def _capacity_now(self) -> int | None:
        capacity = self._capacity
        if callable(capacity):
            try:
                capacity = capacity()
            except Exception:  # a user hook on the report path: never fail the call
                _log.exception("the load meter's capacity callable failed")
                return None
        return capacity if capacity and capacity > 0 else None

    def _application_utilization(self, mean_in_flight: float) -> float:
        application = self._application
        if application is not None:
            if callable(application):
                try:
                    application = application()
                except Exception:  # a user hook on the report path: never fail the call
                    _log.exception("the load meter's application_utilization callable failed")
                    return 0.0
            if math.isfinite(application) and application >= 0:
                return float(application)
            _log.warning("application utilization %r dropped: not a number >= 0", application)
            return 0.0
        capacity = self._capacity_now()
        return mean_in_flight / capacity if capacity else 0.0

    def _cpu(self, now: float) -> float:
        then, cpu_then = self._cpu_at
        if now - then >= self._cpu_window_s:
            cpu_now = self._cpu_clock()
            self._cpu_utilization = max(0.0, (cpu_now - cpu_then) / (now - then) / self._cpus)
            self._cpu_at = (now, cpu_now)
        return self._cpu_utilization

    def _connections(self, now: float) -> int:
        if now - self._peers_pruned >= self._peer_window_s / 4:
            horizon = now - self._peer_window_s
            self._peers = {peer: seen for peer, seen in self._peers.items() if seen >= horizon}
            self._checked = {
                peer: seen for peer, seen in self._checked.items() if seen[1] >= horizon
            }
            self._peers_pruned = now
        return len(self._peers)


def _report(
    cpu: float, application: float, rps: float, eps: float, in_flight: float, connections: float
) -> LoadReport:
    return LoadReport(
        cpu_utilization=cpu,
        application_utilization=application,
        rps_fractional=rps,
        eps=eps,
        named_metrics=MappingProxyType({"in_flight": in_flight, "connections": connections}),
    )


def _encoded(
    cpu: float, application: float, rps: float, eps: float, in_flight: float, connections: float
) -> bytes:
    return _WIRE.pack(
        *(_WIRE_KEYS[0], cpu, _WIRE_KEYS[1], application),
        *(_WIRE_KEYS[2], rps, _WIRE_KEYS[3], eps),
        *(0x42, 20, 0x0A, 9, b"in_flight", 0x11, in_flight),
        *(0x42, 22, 0x0A, 11, b"connections", 0x11, connections),
    )
