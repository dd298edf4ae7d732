"""The per-call routing core: the decisions every routing channel shares, with no grpc I/O.

A call on the balanced channel or the dial-per-request channel, sync or ``grpc.aio``, goes
through the same steps: acquire a route (a lane of the pool, a fresh connection), attempt the
call on the route's channel, classify how the attempt ended, decide whether to send it again
(:class:`~grpc_balance_mw.retry.RetryPolicy`), and give the route back exactly once. The
adapters do the I/O; what they decide is decided here, once, so the four adapters cannot drift
(as tenacity's ``BaseRetrying`` decides and its sync and async drivers are short loops).

- :class:`Router`: what a channel flavour plugs in: it hands out routes and is told
  ``release(route, outcome, in_callback)`` once per route. The balanced channel's routes are
  its lanes, dial-per-request's are fresh connections (the sync and aio facades,
  :mod:`grpc_balance_mw.routed_channel` and :mod:`grpc_balance_mw.aio.routed_channel`, add
  ``acquire`` and ``multicallable``).
- :class:`Outcome` / :func:`outcome_of`: how an attempt ended, as a router needs to know it
  (its pod went away; it ran out of time).
- :class:`Ticket`: one call's hold on its route, released once however many ends of the call
  report it (the response iterator's end, a done-callback, ``cancel()``, the call object being
  garbage-collected: grpcio runs no done-callback for a stream dropped half-read).
- :func:`never_sent`: whether a failure proves the call never left the client, so sending it
  again cannot repeat anything (see :mod:`grpc_balance_mw.retry`).
- :func:`check_metadata`: grpc's own metadata check, done before a route is taken.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import grpc

from grpc_balance_mw._grpcio import accepts_registered_method
from grpc_balance_mw.errors import BalanceError, ConfigurationError
from grpc_balance_mw.orca import TRAILER_KEYS, LoadReport, MalformedLoadReport, decode_load_report
from grpc_balance_mw.pool import Lane, LanePool, LaneState, NoLane
from grpc_balance_mw.pool.health import names_a_pod
from grpc_balance_mw.pool.outliers import POD_FAILURES

__all__ = [
    "CALL_KINDS",
    "NEVER_SENT",
    "NO_OUTCOME",
    "OK",
    "ChannelFactory",
    "ConnectionRoutes",
    "LaneRoutes",
    "Lease",
    "MethodSpec",
    "NoRoute",
    "Outcome",
    "Router",
    "Ticket",
    "can_call",
    "channel_method",
    "check_channel_options",
    "check_form",
    "check_metadata",
    "error_outcome",
    "lane_factory",
    "made_for",
    "never_sent",
    "outcome_of",
    "request_for_attempt",
]

_log = logging.getLogger(__name__)

_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_OK = grpc.StatusCode.OK
_DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED
_POD_FAILURES = frozenset(code for code in grpc.StatusCode if code.name in POD_FAILURES)

#: What grpc core (and this package) says of a call that never left the client: no connection
#: could be made for it, so no server saw it. Matched at the start of the details only.
NEVER_SENT = (
    "failed to connect to all addresses",  # grpc core's pick_first / round_robin, every grpcio
    "the balanced channel has no lane",  # this package's own: no route at all
)

Route = TypeVar("Route")
Channel = TypeVar("Channel", covariant=True)
Made = TypeVar("Made")
MadeFor = TypeVar("MadeFor", bound=Callable[..., Any])


class ChannelFactory(Protocol[Channel]):
    """Makes one more channel like the user's, for a lane; the same form in both flavours.

    Called as ``factory(extra_options, interceptors)``: ``extra_options`` are the lane's own
    channel options (``grpc.use_local_subchannel_pool``, so that it gets a connection of its
    own), to add after the user's; ``interceptors`` are client interceptors to give the channel
    after the user's (``grpc.aio`` lanes pass the user's; sync lanes pass none, as they observe
    by wrapping the channel). ``channel_factory(target, credentials, options)`` of either
    flavour makes one. A sync factory of one argument, ``factory(extra_options)`` (the form
    before), is still accepted for one release, with a ``DeprecationWarning``.
    """

    def __call__(
        self, extra_options: Sequence[tuple[str, Any]], interceptors: Sequence[Any], /
    ) -> Channel: ...


def can_call(factory: Callable[..., Any], *arguments: object) -> bool | None:
    """Whether ``factory`` can be called with ``arguments`` (None: Python cannot tell)."""
    try:
        inspect.signature(factory).bind(*arguments)
    except TypeError:
        return False
    except ValueError:  # a callable Python cannot describe
        return None
    return True


def made_for(factory: MadeFor, form: str) -> MadeFor:
    """Mark ``factory`` as making channels of ``form`` ("sync" or "grpc.aio"), so that a
    factory of the other flavour is refused when it is given, not when a lane is opened."""
    factory._grpc_balance_form = form  # type: ignore[attr-defined]
    return factory


def check_form(factory: Callable[..., Any], form: str, where: str) -> None:
    """Refuse a factory :func:`made_for` the other flavour."""
    made = getattr(factory, "_grpc_balance_form", None)
    if made is not None and made != form:
        package = "grpc_balance_mw" if form == "sync" else "grpc_balance_mw.aio"
        raise ConfigurationError(
            f"{where}: this factory makes {made} channels; a {form} channel needs one of "
            f"{package}.channel_factory"
        )


def lane_factory(factory: Callable[..., Made], form: str) -> ChannelFactory[Made]:
    """``factory`` as ``form``'s lanes call it, ``factory(extra_options, interceptors)``; a
    sync factory of the old one-argument form is wrapped (with a ``DeprecationWarning``), for
    one release."""
    check_form(factory, form, "channel factory")
    if (
        form != "sync"
        or can_call(factory, (), ()) is not False
        or can_call(factory, ()) is not True
    ):
        return factory  # the form of ChannelFactory, or one Python cannot tell: called as is
    warnings.warn(
        "a channel factory of one argument, factory(extra_options), is deprecated: take "
        "factory(extra_options, interceptors), as grpc_balance_mw.balanced.ChannelFactory says",
        DeprecationWarning,
        stacklevel=3,
    )

    def old_form(extra_options: Sequence[tuple[str, Any]], interceptors: Sequence[Any]) -> Made:
        if interceptors:
            raise ConfigurationError(
                "this channel factory takes no interceptors: take factory(extra_options, "
                "interceptors)"
            )
        return factory(extra_options)

    return old_form


class Outcome(NamedTuple):
    """How one attempt ended, as the router needs it.

    Attributes:
        code: its status (None: not known, e.g. a stream dropped half-read).
        pod_named: its trailers name the pod that sent the status (the pod is alive).
        trailing: its trailing metadata, when the router reads them (load reports) and
            they were at hand; else None.
        started: when it started, by the router's clock, if the router times calls
            (:meth:`LaneRoutes.started`); else None.
    """

    code: grpc.StatusCode | None
    pod_named: bool = False
    trailing: Any = None
    started: float | None = None

    @property
    def pod_gone(self) -> bool:
        """Failed UNAVAILABLE and no pod sent that status: its connection or its pod is gone,
        so the route takes no more calls. A pod that answers UNAVAILABLE itself (overloaded,
        say) names itself in the trailers: it is alive, and its lane stays (redialling on
        every such answer would add connections to the load of an outage)."""
        return self.code is _UNAVAILABLE and not self.pod_named

    @property
    def pod_failed(self) -> bool:
        """A status the pod that answered is to blame for (outlier ejection counts it; see
        :data:`~grpc_balance_mw.pool.outliers.POD_FAILURES`): not CANCELLED, not an
        application's NOT_FOUND or INVALID_ARGUMENT. DEADLINE_EXCEEDED is :attr:`timed_out`."""
        return self.code in _POD_FAILURES and not self.pod_gone

    @property
    def timed_out(self) -> bool:
        """It passed its deadline (a hung pod's calls do, while other lanes answer)."""
        return self.code is _DEADLINE_EXCEEDED


#: A call that ended without a status the router could read (dropped, or cancelled).
NO_OUTCOME = Outcome(None)
OK = Outcome(grpc.StatusCode.OK)


def outcome_of(
    code: grpc.StatusCode | None, trailing: Any = None, started: float | None = None
) -> Outcome:
    """The outcome of an attempt that ended with ``code`` and ``trailing`` metadata (kept on
    the outcome for the router's load reports); ``started``: when a timed attempt began
    (only a successful one's latency is kept)."""
    if code is None:
        return NO_OUTCOME
    if code is _OK:
        if not trailing and started is None:
            return OK
        return Outcome(_OK, False, trailing or None, started)
    return Outcome(code, code is _UNAVAILABLE and names_a_pod(trailing), trailing or None)


#: Malformed load reports are logged at most this often (a pod sends one on every call).
MALFORMED_LOG_S = 60.0
_malformed_logged_at: float | None = None


def load_report_in(trailing: Any) -> LoadReport | None:
    """The ORCA load report in a call's trailing metadata, if any (gRFC A51), under either
    key of :data:`~grpc_balance_mw.orca.TRAILER_KEYS` (grpcio publishes only the first).

    Raises:
        MalformedLoadReport: the trailer is there but holds no report.
    """
    for key, value in trailing:
        if key in TRAILER_KEYS:
            return decode_load_report(value if isinstance(value, bytes) else value.encode())
    return None


def note_malformed(error: MalformedLoadReport) -> None:
    """A report was dropped: warn, at most once per :data:`MALFORMED_LOG_S` (a pod that sends
    a bad one sends it on every call), and at debug level the rest of the time."""
    global _malformed_logged_at
    now = time.monotonic()
    if _malformed_logged_at is None or now - _malformed_logged_at >= MALFORMED_LOG_S:
        _malformed_logged_at = now
        _log.warning("a load report was dropped (its call went on): %s", error)
    else:
        _log.debug("a load report was dropped: %s", error)


def error_outcome(error: BaseException) -> Outcome:
    """The outcome of an attempt that raised ``error`` (a ``grpc.Call`` error, sync or aio)."""
    code = getattr(error, "code", None)
    trailing = getattr(error, "trailing_metadata", None)
    if not callable(code):
        return NO_OUTCOME
    value = code()
    return outcome_of(
        value if isinstance(value, grpc.StatusCode) else None,
        trailing() if callable(trailing) and value is _UNAVAILABLE else None,
    )


def never_sent(error: BaseException | None) -> bool:
    """Whether a failed attempt provably never left the client: UNAVAILABLE because no
    connection could be made (grpc core's "failed to connect to all addresses"), or no route
    (the balanced channel without a connected lane). No server saw such a call, so sending it
    again repeats nothing, whether or not its method is idempotent.

    Deliberately narrow. A call that reached a server shutting down (``server.stop(grace)``)
    before any handler ran cannot be told, on the client, from a call whose handler ran and
    was then cut off at the end of the grace: grpcio ends both alike (UNAVAILABLE "Cancelling
    all calls", or CANCELLED), with no headers and no trailers, hence no pod stamp. Those are
    left to the idempotent-method rules (UNAVAILABLE is retryable for marked methods, and the
    lane is drained since no pod named itself); the server half of the remedy (a drain:
    NOT_SERVING first, keep serving longer than the clients' health-check interval, then stop)
    keeps new calls away from a stopping pod instead.
    """
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if not callable(code) or not callable(details):
        return False
    try:
        if code() is not _UNAVAILABLE:
            return False
        text = details()
    except TypeError:  # accessors that are not grpc's zero-argument ones
        return False
    return isinstance(text, str) and text.startswith(NEVER_SENT)


class NoRoute(BalanceError):
    """No route can take a call now (no lane has a connection); the facades turn it into the
    UNAVAILABLE a grpc channel without a connection gives. Its message starts with one of
    :data:`NEVER_SENT`."""


class Router(Protocol[Route]):  # type: ignore[misc]
    """What a channel flavour plugs into the routing core (the facades add how a route makes
    its calls and, for ``wait_for_ready``, whether to wait for one)."""

    def release(self, route: Route, outcome: Outcome, in_callback: bool) -> None:
        """The attempt on ``route`` ended with ``outcome``; called exactly once per route.
        ``in_callback``: called from a done-callback (grpcio's thread, or the event loop's
        callback): do not wait there."""

    def reads_trailers(self, route: Route) -> bool:
        """Whether the outcome of a successful attempt on ``route`` should carry its
        trailing metadata (:func:`outcome_of`): the router reads load reports there."""

    def started(self) -> float | None:
        """The time an attempt starts now, if the router times calls (else None)."""


#: Held by a ticket only to take its route (two attribute operations, nothing called inside):
#: one lock for every ticket costs no contention worth a lock allocated per call. Re-entrant:
#: a dropped stream's finalizer (another ticket's release) may run inside it, on this thread.
_TAKING = threading.RLock()


class Ticket(Generic[Route]):
    """One call's hold on its route: released once, however many ends of the call report it.

    It holds no reference to the call or its wrapper, so ``weakref.finalize(wrapper,
    ticket.release)`` can give the route back when a dropped call is garbage-collected.
    """

    __slots__ = ("__weakref__", "_route", "_router")

    def __init__(self, router: Router[Route], route: Route) -> None:
        self._router = router
        self._route: Route | None = route

    @property
    def route(self) -> Route | None:
        """The route, until it is released."""
        return self._route

    def reads_trailers(self) -> bool:
        """Whether the call's outcome should carry its trailing metadata (see
        :meth:`Router.reads_trailers`); False once released."""
        route = self._route
        return route is not None and self._router.reads_trailers(route)

    def release(self, outcome: Outcome = NO_OUTCOME, in_callback: bool = False) -> bool:
        """Give the route back with ``outcome``; False if it was given back already."""
        with _TAKING:
            route, self._route = self._route, None
        if route is None:
            return False
        self._router.release(route, outcome, in_callback)
        return True


def request_for_attempt(stream_request: bool, request: Any) -> Any:
    """The request to hand one attempt: grpcio calls ``next()`` on a request stream, so a list
    or tuple (replayable, hence retryable) becomes a fresh iterator for each attempt."""
    if stream_request and isinstance(request, (list, tuple)):
        return iter(request)
    return request


def check_metadata(metadata: Any) -> None:
    """Raise TypeError, as grpc does when the call is made, for metadata that is not a sequence
    of (str key, str or bytes value) pairs. Checked before a route is taken, so a call that
    cannot start never holds a lane nor reaches an interceptor that would wait for it."""
    if metadata is None:
        return
    try:
        pairs = tuple(metadata)
    except TypeError:
        raise TypeError(f"metadata must be a sequence of pairs, not {type(metadata)}") from None
    for pair in pairs:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise TypeError(f"metadata entries must be (key, value) pairs, got {pair!r}") from None
        if not isinstance(key, str):
            raise TypeError(f"Expected str, not {type(key)}")
        if not isinstance(value, (str, bytes)):
            raise TypeError(f"Expected str or bytes, not {type(value)}")


def check_channel_options(options: Iterable[Any] | None, where: str) -> tuple[Any, ...]:
    """Channel options as a tuple of (key, value) pairs, or a ConfigurationError that says how
    to pass them (the common slip: ``ObserveOptions`` passed where grpc channel options go)."""
    if options is None:
        return ()
    if isinstance(options, (str, bytes)) or not isinstance(options, Iterable):
        raise ConfigurationError(
            f"{where}: options must be grpc channel options, a sequence of (key, value) pairs, "
            f"got {type(options).__name__}"
            + (
                "; ObserveOptions go to observe(channel, ObserveOptions(...)), not to the "
                "channel factory"
                if type(options).__name__ == "ObserveOptions"
                else ""
            )
        )
    pairs = tuple(options)
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise ConfigurationError(
                f"{where}: each channel option must be a (str key, value) pair, got {pair!r}"
            )
    return pairs


class MethodSpec(NamedTuple):
    """One method of a channel, as each route's channel makes its multicallable."""

    kind: str
    method: str
    request_serializer: Any
    response_deserializer: Any
    registered: bool

    def make(self, channel: Any) -> Any:
        """This method's multicallable on ``channel`` (a ``grpc.Channel`` or ``grpc.aio`` one)."""
        make = getattr(channel, self.kind)
        args = (self.method, self.request_serializer, self.response_deserializer)
        if self.registered and accepts_registered_method(channel):
            return make(*args, _registered_method=True)
        return make(*args)  # not registered, or a channel (a wrapper) that predates the flag


#: The four call kinds of ``grpc.Channel`` and ``grpc.aio.Channel``.
CALL_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def channel_method(kind: str) -> Callable[..., Any]:
    """The ``grpc.Channel`` (or ``grpc.aio.Channel``) method for one call kind, for a facade
    whose ``_method(spec)`` makes the multicallable: the four are one table, not four copies."""

    def method(
        self: Any,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        spec = MethodSpec(
            kind, method, request_serializer, response_deserializer, bool(_registered_method)
        )
        return self._method(spec)

    method.__name__ = method.__qualname__ = kind
    return method


#: A lane whose pod sent no load report yet has the trailers of one call in this many read (a
#: sync unary call then costs a ``with_call``), so a pod that starts reporting is found.
REPORT_PROBE = 16


class LaneRoutes:
    """The router half of a balanced channel, sync or aio: its routes are the pool's lanes.

    The lane's connection (``lane.connection``) keeps ``channel`` (what calls are made on) and
    ``callables`` (each method's multicallable, made once per lane).
    """

    pool: LanePool

    def acquire(self, wait_for_ready: bool) -> Lane:
        """A lane for one attempt; with ``wait_for_ready``, only once a lane's pod answered (a
        lane still being checked may be on its way out, cancelling the waiting call)."""
        pool = self.pool
        if pool.forked:
            raise self.forked_error()
        if wait_for_ready and not any(lane.state is LaneState.ACTIVE for lane in pool.lanes):
            raise NoRoute("the balanced channel has no lane with a connection yet")
        try:
            return pool.acquire()
        except NoLane as error:
            raise NoRoute(str(error)) from error

    def forked_error(self) -> BalanceError:
        """What a call on a channel made before ``os.fork()`` raises in the child."""
        return NoRoute("the balanced channel was made before os.fork()")

    def multicallable(self, lane: Lane, spec: MethodSpec) -> Any:
        connection = lane.connection
        inner = connection.callables.get(spec)
        if inner is None:
            inner = connection.callables[spec] = spec.make(connection.channel)
        return inner

    def started(self) -> float | None:
        """The pool's clock now if its picker weighs lanes by latency (Peak-EWMA), else None:
        a unary-response attempt keeps it and hands it back on its outcome."""
        pool = self.pool
        return pool.clock() if pool.times_calls else None

    def reads_trailers(self, lane: Lane) -> bool:
        """Whether the attempt on ``lane`` should hand its trailing metadata to the outcome
        (where getting them costs something: a sync unary call's ``with_call``): only when
        the picker weighs lanes by load reports; then for a lane whose pod reports, once its
        last report is :data:`~grpc_balance_mw.pool.weights.READ_EVERY_S` old, by the
        pool's clock at its last plan; for one whose pod sent none yet, on one call in
        :data:`REPORT_PROBE` (its first included), to find out whether it does."""
        pool = self.pool
        if not pool.reads_reports:
            return False
        load = lane.load
        if load is None or not load.reports:
            return lane.calls % REPORT_PROBE == 1
        return load.read_after <= pool.planned_at

    def release(self, lane: Lane, outcome: Outcome, in_callback: bool) -> None:
        """Tell the pool: a lane whose pod went away takes no more calls; a call that passed
        its deadline is evidence against a hung pod; one its pod failed counts against it
        for outlier ejection; the load report in its trailers goes to the picker (every call
        kind, sync and aio, ends here)."""
        if outcome is OK:  # most calls: nothing to read off the outcome
            self.pool.release(lane)
            return
        pool = self.pool
        report = None
        if outcome.trailing is not None and pool.reads_reports:
            try:
                report = load_report_in(outcome.trailing)
            except MalformedLoadReport as error:  # the report is dropped, never the call
                pool.malformed_reports += 1
                note_malformed(error)
        if outcome.code is _OK:
            pool.release(lane, report=report, started=outcome.started)
        elif outcome.pod_failed:  # the pod answered, with an error it is to blame for
            pool.release(lane, failed=True, report=report)
        else:
            pool.release(
                lane, unavailable=outcome.pod_gone, timed_out=outcome.timed_out, report=report
            )


class Lease:
    """Dial-per-request's route: one call's own connection, closed once."""

    __slots__ = ("channel", "predialled")

    def __init__(self, channel: Any, predialled: bool) -> None:
        self.channel = channel
        self.predialled = predialled


class ConnectionRoutes:
    """The router half of a dial-per-request channel, sync or aio: a connection per attempt
    (``connection()``; grpc itself waits for it with ``wait_for_ready``)."""

    _closed: bool

    def connection(self) -> Lease:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def acquire(self, wait_for_ready: bool) -> Lease:
        return self.connection()

    def reads_trailers(self, lease: Lease) -> bool:
        """A connection per call weighs nothing: no trailers to read."""
        return False

    def started(self) -> float | None:
        """Nor are its calls timed."""
        return None

    def multicallable(self, lease: Lease, spec: MethodSpec) -> Any:
        return spec.make(lease.channel)


class NoLaneError(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    """UNAVAILABLE: the channel has no route with a connection now (as a grpc channel without
    a connection fails a call); retryable like any UNAVAILABLE, and never sent. The
    ``grpc.aio`` channels raise :class:`grpc_balance_mw.aio.routed_channel.NoLaneError`, a
    subclass that is also a ``grpc.aio.AioRpcError``: ``except NoLaneError`` catches both."""

    def __init__(self, details: str = "") -> None:
        super().__init__(details)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False

    # As a response stream and a future that failed before they started.
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def done(self) -> bool:
        return True

    def running(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> BaseException:
        return self


@dataclass
class RedialStats:
    """Connections a dial-per-request channel made (sync and ``grpc.aio`` alike):
    ``predialled`` were connected before their call was made."""

    dialled: int = 0
    predialled: int = 0
    predial_failures: int = 0
    closed: int = 0

    def __getitem__(self, name: str) -> int:
        """``stats["dialled"]``: the ``grpc.aio`` channel's stats were a dict; deprecated."""
        warnings.warn(
            "stats[name] is deprecated: read stats.name (RedialStats)",
            DeprecationWarning,
            stacklevel=2,
        )
        if name not in _STATS_FIELDS:
            raise KeyError(name)
        return int(getattr(self, name))


_STATS_FIELDS = frozenset(field.name for field in fields(RedialStats))
