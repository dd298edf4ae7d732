"""The balanced channel (sync): a ``grpc.Channel`` made of lanes, each its own TCP connection.

Usage::

    channel = balanced_channel("charge-points.ev.svc.cluster.local:50051")
    stub = ChargePointsStub(channel)          # stubs and grpc.intercept_channel take it as it is
    ...
    channel.close()

One channel through a Kubernetes ClusterIP Service puts every call on one pod, because kube-proxy
picks the pod when the connection opens. This channel keeps several connections ("lanes") to the
same target, learns which pod each reached (a ``grpc.health.v1`` check on the fresh connection
reads the identity the pod stamps), redials lanes until they cover distinct pods, and picks a
lane per call. The bookkeeping is :class:`~grpc_balance_mw.pool.LanePool` (pure, shared with
:mod:`grpc_balance_mw.aio.balanced`); this module opens, checks and closes the connections it
plans, on one background thread, and counts each call in and out of its lane.

A call takes a lane's in-flight count until it ends: unary calls when they return (``future``: a
done-callback, which never waits on the call since grpcio runs it on the channel's own thread),
streams when the response iterator ends or the call is cancelled or done. A lane whose call fails
with UNAVAILABLE (its pod was killed) takes no more calls and is replaced; a lane whose health
checks go unanswered (its pod hangs) is replaced too.

Retries are opt-in (``retry=RetryPolicy(...)``, the dial-per-request channel's policy): a call
of a method marked idempotent that fails with a retryable code is sent again on another lane,
within its deadline and the retry budget; a response stream only before its first message;
``future()`` calls are sent once; a call that never left the client (no lane with a
connection) is sent again whether marked or not. Without a connected lane (every dial failing) a
call fails UNAVAILABLE (:class:`NoLaneError`), unless it was made with ``wait_for_ready=True``:
then it waits for a lane whose pod answered, up to its deadline. The per-call routine is the
routing core's (:mod:`grpc_balance_mw.routed_channel`); this module is its router. Thread-safe;
see ``docs/concurrency.md`` (and :class:`ForkedChannelError` for ``os.fork()``). A channel that
is never closed is released with its last reference (its thread holds only a weak one).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from grpc_balance_mw._routing import ChannelFactory as LaneChannelFactory
from grpc_balance_mw._routing import LaneRoutes, check_channel_options, lane_factory, made_for
from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.errors import BalanceError, ConfigurationError
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS
from grpc_balance_mw.observed_methods import ObservedChannel
from grpc_balance_mw.observing import (
    ObserveOptions,
    build_observer,
    chosen_options,
    detector_for,
)
from grpc_balance_mw.pool import (
    CheckResult,
    Lane,
    LanePool,
    Picker,
    Plan,
    PoolConfig,
    Rotation,
    Signals,
    Stuck,
)
from grpc_balance_mw.pool.health import (
    CHECK_GRACE_S,
    CheckFaults,
    read_check,
    read_reply,
)
from grpc_balance_mw.pool.outliers import OUTLIERS
from grpc_balance_mw.pool.pool import pool_for_channel
from grpc_balance_mw.retry import NO_RETRY, RetryPolicy, warn_if_native_retry
from grpc_balance_mw.routed_channel import Connectivity, NoLaneError, RoutedChannel

__all__ = [
    "BalancedChannel",
    "ChannelFactory",
    "ForkedChannelError",
    "NoLaneError",
    "balanced_channel",
    "channel_factory",
]

_log = logging.getLogger(__name__)

Options = Sequence[tuple[str, Any]]
#: Makes one lane's channel: ``factory(extra_options, interceptors)`` (see
#: :class:`grpc_balance_mw._routing.ChannelFactory`, the same form as ``grpc.aio``'s).
ChannelFactory = LaneChannelFactory[grpc.Channel]
#: gRPC core shares one connection between channels with the same target and arguments; this
#: gives each lane a connection of its own.
LOCAL_POOL_OPTION = ("grpc.use_local_subchannel_pool", 1)
#: Maintenance rounds that run back to back while lanes are being redialled.
_BURST_ROUNDS = 16


def channel_factory(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options | None = None,
    compression: grpc.Compression | None = None,
) -> ChannelFactory:
    """The factory ``grpc.secure_channel`` / ``insecure_channel`` make: TLS for every lane when
    ``credentials`` are given (never a downgrade on a redial); the interceptors it is given
    wrap the channel (``grpc.intercept_channel``).

    Raises:
        ConfigurationError: ``options`` are not grpc channel options (``ObserveOptions`` go
            to ``observe()``, not here).
    """
    base = check_channel_options(options, "channel_factory")

    def make(extra: Options, interceptors: Sequence[Any] = ()) -> grpc.Channel:
        merged = (*base, *extra)
        if credentials is not None:
            channel = grpc.secure_channel(target, credentials, merged, compression)
        else:
            channel = grpc.insecure_channel(target, merged, compression)
        return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

    return made_for(make, "sync")


def check_result(
    future: Any, timeout: float, headers: tuple[str, ...] = DEFAULT_POD_HEADERS
) -> CheckResult:
    """What one health-check future says, waiting at most ``timeout`` seconds for it (called
    off grpcio's threads). The check carries its own deadline, so the wait normally ends with
    it; should the call outlive it (a gRPC core that never fires the deadline), the future is
    cancelled and the check counts as a pod not reached, so that the maintenance thread, and
    ``close()`` joining it, are never held for good."""
    try:
        response = future.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        future.cancel()
        return read_check("DEADLINE_EXCEEDED", False)
    except grpc.RpcError as error:
        return read_check(error.code().name, False, None, error.trailing_metadata(), headers)
    return read_reply(response, future.initial_metadata(), future.trailing_metadata(), headers)


class _LaneConnection:
    """What the channel keeps for one lane: its own channel, the observed one, its callables."""

    __slots__ = ("callables", "channel", "check", "raw")

    def __init__(self, raw: grpc.Channel, channel: grpc.Channel) -> None:
        self.raw = raw
        self.channel = channel
        self.check = check_method(raw, lenient=True)
        self.callables: dict[Any, Any] = {}


class ForkedChannelError(BalanceError, ValueError):
    """A balanced channel made before ``os.fork()`` was used in the child: its maintenance thread
    stayed in the parent (no rotation, no health checks), and its lanes are the parent's
    connections. Make the channel after the fork (e.g. in a pre-fork server's worker start)."""


def _maintenance(channel: Any, first: Plan) -> None:
    """The maintenance thread's body, on a weak proxy of the channel: an unclosed channel
    whose last reference is dropped is collected (its finalizer closes the lanes), and the
    thread then ends."""
    with contextlib.suppress(ReferenceError):
        BalancedChannel._maintain(channel, first)


def _finalize(
    stop: threading.Event,
    wake: threading.Event,
    pool: LanePool,
    connectivity: Connectivity,
    detector: AffinityDetector,
    unmarked: threading.Lock,
) -> None:
    """Release what an unclosed, garbage-collected channel held: the thread (told to stop),
    the lanes' connections (and their health checks), the connectivity connection, and the
    detector's note that the target's calls run on lanes."""
    stop.set()
    wake.set()
    if unmarked.acquire(blocking=False):  # never released: once per channel
        detector.lanes_opened(False)
    if pool.forked:  # in a forked child the lanes are the parent's connections: leave them
        pool.close()
        return
    for lane in pool.close():
        connection: _LaneConnection | None = lane.connection
        if connection is not None:
            connection.callables.clear()
            connection.raw.close()
    connectivity.close()


class BalancedChannel(LaneRoutes, RoutedChannel[Lane]):
    """A ``grpc.Channel`` that spreads calls over lanes to distinct pods; see the module doc.

    Made by :func:`balanced_channel`; this constructor takes a channel factory for users who
    build their channels themselves.

    Args:
        factory: makes one lane's channel from options (the lane adds its own).
        target: the target string, for the affinity detector, spans and logs.
        pool: the lanes' bookkeeping (its config, picker and rotation).
        observe: observe each lane, so spans carry pod and lane and the target's affinity
            detector (whose alarm is a rotation trigger) is fed: True with the default
            :class:`ObserveOptions`, or the options to use (their ``probe`` is not used: the
            pool's scouts look for pods); False: not observed.
        check_timeout_s: deadline of each health check that names a lane's pod.
        tick_s: how often the maintenance thread plans (rotations, scouts, drains).
        retry: which calls are sent again, on another lane, when an attempt fails (e.g. its
            pod was killed): the same :class:`~grpc_balance_mw.retry.RetryPolicy` as the
            dial-per-request channel's; default: none.
        sleep: how retries sleep (tests inject one).

    The channel is its own router (:class:`~grpc_balance_mw.routed_channel.SyncRouter`): its
    routes are the pool's lanes. Dropping the last reference to an unclosed channel releases
    its thread, connections and health checks, as grpc's own channels do.
    """

    def __init__(
        self,
        factory: ChannelFactory,
        target: str,
        *,
        pool: LanePool | None = None,
        observe: ObserveOptions | bool = True,
        check_timeout_s: float = 1.0,
        tick_s: float = 0.25,
        retry: RetryPolicy = NO_RETRY,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if check_timeout_s <= 0 or tick_s <= 0:
            raise ConfigurationError("check_timeout_s and tick_s must be > 0")
        self.target = target
        self.retry = retry
        self.sleep = sleep
        chosen = chosen_options(observe)
        self._observe = chosen is not None
        self._options = chosen if chosen is not None else ObserveOptions()
        self.pool = (
            pool
            if pool is not None
            else LanePool(PoolConfig(expected_pods=self._options.expected_pods))
        )
        self._factory = factory = lane_factory(factory, "sync")
        self.detector: AffinityDetector = detector_for(target, self._options)
        # One model of the target's pods: the detector judges from what the lanes found.
        self.pool.share_membership(self.detector.membership)
        # The target's calls (these at least) run on lanes: an alarm's advice is not to use them.
        self.detector.lanes_opened()
        self._unmarked = threading.Lock()  # taken by the first close() only
        self._check_timeout_s = check_timeout_s
        self._tick_s = tick_s
        self._stop = threading.Event()
        # Set by close() and by the first call after an idle round (the pool's on_wake).
        self._wake = threading.Event()
        self.pool.on_wake = self._wake.set
        self._connectivity = Connectivity(lambda: factory((LOCAL_POOL_OPTION,), ()))
        self._faults = CheckFaults(_log, target)
        forking.track(self)
        # Open the first lanes now (lazily, as grpc channels are) so calls can start at once;
        # their checks run on the maintenance thread.
        first = self.pool.plan(signals=self._signals())
        for lane in first.dial:
            self._open(lane)
        self._finalizer = weakref.finalize(
            self,
            _finalize,
            self._stop,
            self._wake,
            self.pool,
            self._connectivity,
            self.detector,
            self._unmarked,
        )
        self._thread = threading.Thread(
            target=_maintenance,
            args=(weakref.proxy(self), first),
            name=f"balanced-channel {target}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"<BalancedChannel {self.target} {self.pool!r}>"

    @property
    def stuck(self) -> Stuck | None:
        """Why rotation cannot spread the calls (session affinity, an L7 proxy), if so."""
        return self.pool.stuck

    def reset_after_fork(self) -> None:
        """In a forked child: refuse calls (:class:`ForkedChannelError`), with fresh locks so
        that ``close()`` cannot block on one the parent's threads held at the fork."""
        self.pool.reset_after_fork()
        self._stop = threading.Event()
        self._stop.set()

    # -- lanes -----------------------------------------------------------------------------

    def _open(self, lane: Lane) -> None:
        raw = self._factory((LOCAL_POOL_OPTION,), ())
        lane.connection = _LaneConnection(raw, self._observed(raw, lane))

    def _observed(self, raw: grpc.Channel, lane: Lane) -> grpc.Channel:
        """The one place a lane's channel is observed."""
        if not self._observe:
            return raw
        options = self._options.but(lane=lane.name, probe=False)
        return ObservedChannel(raw, build_observer(self.target, options))

    def _signals(self) -> Signals:
        if not self._observe:
            return Signals()
        snapshot = self.detector.snapshot()
        return Signals(snapshot.state.value, snapshot.top_pod, snapshot.known_count)

    def _maintain(self, first: Plan) -> None:
        plan: Plan | None = first
        burst = 0
        while not self._stop.is_set():
            pause = self._tick_s
            try:
                if plan is None:
                    plan = self.pool.plan(signals=self._signals)
                busy, pause = bool(plan.dial), plan.pause(self._tick_s)
                self._carry_out(plan)
            except Exception:  # a background thread: nothing above it would see the error
                _log.exception("balanced channel %s: maintenance round failed", self.target)
                busy = False
            plan = None
            burst = burst + 1 if busy and burst < _BURST_ROUNDS else 0
            if not burst:
                self._wake.wait(pause)  # a tick, or longer while idle: a call or close() wakes
                self._wake.clear()

    def _carry_out(self, plan: Plan) -> None:
        for lane in plan.close:
            self._close_lane(lane)
        for message in plan.warnings():
            _log.warning("balanced channel %s: %s", self.target, message)
        for lane in plan.drain:
            _log.debug("balanced channel %s: %r drains", self.target, lane)
        for event in plan.outliers:  # the log, and an event on the next call's span
            _log.log(event.level, "balanced channel %s: %s", self.target, event.message)
            self.detector.note_pod_event(event.kind, event.endpoint, OUTLIERS, event.at)
        lanes = [*plan.dial, *plan.check]
        while lanes and not self._stop.is_set():
            self._check(lanes)
            lanes = self.pool.confirmations()  # new pods' names, checked once more

    def _check(self, lanes: Sequence[Lane]) -> None:
        # Every lane handed out is reported to the pool whatever fails (a factory that raises
        # once, say while a certificate file is rotated): a lane never reported would stay
        # CHECKING for good, and the pool dials nothing new while a lane is pending.
        checks: list[tuple[Lane, Any]] = []
        for lane in lanes:
            if self._stop.is_set():
                return
            try:
                if lane.connection is None:
                    self._open(lane)
                connection: _LaneConnection = lane.connection
                future = connection.check.future("", timeout=self._check_timeout_s)
            except Exception as error:  # background maintenance: logged, the lane reported
                self.pool.checked(lane, self._faults.failed(lane, error))
                continue
            checks.append((lane, future))
        # Every check was given check_timeout_s; past it and a grace, none is waited for.
        deadline = time.monotonic() + self._check_timeout_s + CHECK_GRACE_S
        for lane, future in checks:
            try:
                left = max(0.0, deadline - time.monotonic())
                result = check_result(future, left, self._options.pod_headers)
            except Exception as error:  # background maintenance: logged, the lane reported
                result = self._faults.failed(lane, error)
            self.pool.checked(lane, self._faults.seen(lane, result))

    def _close_lane(self, lane: Lane) -> None:
        connection: _LaneConnection | None = lane.connection
        if connection is not None:
            connection.callables.clear()
            connection.raw.close()

    # -- the router -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def forked_error(self) -> BalanceError:
        return ForkedChannelError(
            "this balanced channel was made before os.fork(); make one in the child process"
        )

    # -- grpc.Channel ----------------------------------------------------------------------

    def close(self) -> None:
        """Close every lane (their calls are cancelled, as ``grpc.Channel.close`` does) and stop
        the maintenance thread."""
        self._stop.set()
        self._wake.set()
        if self._unmarked.acquire(blocking=False):  # never released: once per channel
            self.detector.lanes_opened(False)
        if self.pool.forked:  # the lanes are the parent's connections: leave them to it
            self.pool.close()
            return
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._finalizer()  # the lanes, the connectivity connection; once

    def __enter__(self) -> BalancedChannel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def balanced_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Options | None = None,
    *,
    lanes: int = 3,
    max_lanes: int = 8,
    follow_pods: bool = True,
    picker: Picker | None = None,
    rotation: Rotation | None = None,
    pool_config: PoolConfig | None = None,
    observe: ObserveOptions | bool = True,
    factory: ChannelFactory | None = None,
    retry: RetryPolicy = NO_RETRY,
    compression: grpc.Compression | None = None,
) -> BalancedChannel:
    """A balanced channel to ``target``, made as ``grpc.secure_channel`` (with ``credentials``)
    or ``grpc.insecure_channel`` (without) would make one channel.

    Args:
        target: the Service's ``host:port`` (or any gRPC target).
        credentials: TLS credentials, used for every lane and every redial; None: plaintext.
        options: channel options, given to every lane.
        lanes: lanes kept at least.
        max_lanes: lanes kept at most while following the number of pods known.
        follow_pods: keep one lane per known pod (between ``lanes`` and ``max_lanes``).
        picker: the lane per call: ``Weighted()`` (the default: by the pods' ORCA load
            reports when they send them, else Envoy's least_request), ``LeastOutstanding()``
            (least_request alone) or ``RoundRobin()``.
        rotation: when lanes are replaced; default every 60 s +/- 20 %, on the affinity alarm
            and when a lane's pod goes away (:func:`~grpc_balance_mw.pool.default_rotation`).
        pool_config: every other setting of the pool (overrides ``lanes``, ``max_lanes``,
            ``follow_pods`` and the expected pods there).
        observe: observe each lane's calls (spans with pod and lane, the affinity detector):
            True with the default :class:`ObserveOptions`, or the options to use (e.g.
            ``ObserveOptions(expected_pods=3, telemetry=AffinityTelemetry())``); False: not.
        factory: makes each lane's channel instead of ``credentials`` and ``options``.
        retry: which calls are sent again on another lane when an attempt fails (the methods
            marked idempotent, UNAVAILABLE by default: a SIGKILLed pod then costs no call),
            within the call's deadline and the retry budget; default: none. ``future()`` calls
            are sent once; a response stream is retried only before its first message.
        compression: the default compression of every lane (as ``grpc.insecure_channel``'s).
    """
    if factory is not None and (credentials is not None or options or compression):
        raise ConfigurationError("pass either a factory or credentials/options, not both")
    if retry.max_attempts > 1:
        warn_if_native_retry(options, target)
    pool = pool_for_channel(
        lanes=lanes,
        max_lanes=max_lanes,
        follow_pods=follow_pods,
        expected_pods=(chosen_options(observe) or ObserveOptions()).expected_pods,
        pool_config=pool_config,
        picker=picker,
        rotation=rotation,
    )
    return BalancedChannel(
        factory
        if factory is not None
        else channel_factory(target, credentials, options, compression),
        target,
        pool=pool,
        observe=observe,
        retry=retry,
    )
