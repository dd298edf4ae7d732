"""Server side, sync (``grpc.server``): stamp the pod identity, wire health, drain on shutdown.

Usage::

    identity = PodIdentity.from_env()
    server = grpc.server(
        ThreadPoolExecutor(16),
        interceptors=[PodIdentityInterceptor(identity)],
        options=connection_age_options(max_age_s=30),
    )
    health = add_health(server)
    server.start()
    drain_on_signals(server, health)  # SIGTERM: NOT_SERVING, serve DRAIN_S more, then stop
    server.wait_for_termination()
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
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
    """A ``grpc.ServicerContext`` that adds the pod identity to whatever metadata goes out
    (see :class:`~grpc_balance_mw._stamping.StampingContext`)."""

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._initial_sent = True
        self._context.send_initial_metadata(merge_identity(initial_metadata, self._stamp))

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.flush()
        self.end(failed=True)
        self._context.abort(code, details)

    def abort_with_status(self, status: grpc.Status) -> None:
        self.flush()
        self._trailing = getattr(status, "trailing_metadata", None)
        self._context.abort_with_status(StampedStatus.of(status, self.end(failed=True)))

    def flush(self) -> None:
        """Send the identity as initial metadata unless something already went out."""
        if not self._flush_due():
            return
        try:
            self._context.send_initial_metadata(self._stamp)
        except (ValueError, grpc.RpcError) as exc:
            # The call was cancelled, or grpc already sent headers itself: the trailers still
            # carry the identity, and the handler's own outcome must win.
            _log.debug("could not send the pod identity as initial metadata: %s", exc)


def _unary_response(behavior: Callable[..., Any], stamp: CallStamp) -> Callable[..., Any]:
    def stamped(request: Any, context: grpc.ServicerContext) -> Any:
        ctx = _StampingContext(context, stamp)
        failed = True
        try:
            response = behavior(request, ctx)
            failed = False
            return response
        finally:
            ctx.flush()
            ctx.end(failed)

    return stamped


def _stream_response(behavior: Callable[..., Any], stamp: CallStamp) -> Callable[..., Any]:
    def stamped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        ctx = _StampingContext(context, stamp)
        failed = True
        responses = None
        try:
            responses = behavior(request, ctx)
            for response in responses if responses is not None else ():
                ctx.flush()
                yield response
            failed = False
        except GeneratorExit:  # the client went away: not the pod's error
            failed = False
            raise
        finally:
            ctx.flush()
            ctx.end(failed)
            close = getattr(responses, "close", None)
            if close is not None:
                close()

    return stamped


class PodIdentityInterceptor(IdentityStamper, grpc.ServerInterceptor):  # type: ignore[misc]
    """Stamps the serving pod's identity on every response, all four call kinds.

    The identity goes into the initial metadata (a streaming client learns it with the first
    message) and the trailing metadata (so errors, aborts and exceptions carry it too).

    With ``load_meter``, every call's trailing metadata also carries the pod's ORCA load report
    (``endpoint-load-metrics-bin``, gRFC A51; see :mod:`grpc_balance_mw.load_meter`), merged
    with what the handler sets, on errors and aborts too. Health checks are not counted as load
    but carry the report (a connection counts from its third check), so a client's health check
    learns the pod's load before its first call. The report goes under two keys, the standard
    one and the one a grpcio client can read (:data:`grpc_balance_mw.orca.GRPCIO_TRAILER_KEY`).
    Off by default: on an empty unary echo it adds about a tenth to a fifth to the server's CPU
    per call (a lock, two clock reads, ``context.peer()``, one ``struct.pack`` and about 200
    more bytes of trailers for grpc core to encode), which only a client that weighs lanes by
    reports pays back; a handler that does real work dilutes it. A meter that fails is logged
    and the call goes on without a report.

    Args:
        identity: who this pod is; default :meth:`PodIdentity.from_env` (downward API), so a
            missing ``POD_NAME``/``HOSTNAME`` fails here, at start-up, not on each call.
        load_meter: report this meter's figures in every call's trailer (e.g.
            ``LoadMeter(capacity=max_workers)``); None: no load reports.
    """

    _wraps = (_unary_response, _stream_response)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        return self._stamped(continuation(handler_call_details), handler_call_details.method)


class PodHealth(HealthReport):
    """The standard ``grpc.health.v1`` service of one server (``Check`` and ``Watch``), flipped
    to NOT_SERVING on shutdown.

    Answers as grpcio-health-checking's ``HealthServicer`` does, with the same :meth:`set` and
    :meth:`enter_graceful_shutdown`, without needing that package. A ``Watch`` holds one of the
    server's threads while it is open, as a watch through any server interceptor does.
    """

    def __init__(self, services: tuple[str, ...]) -> None:
        super().__init__(services)
        self._changed = threading.Condition()

    @property
    def servicer(self) -> PodHealth:
        """This object: what had ``set()`` and ``enter_graceful_shutdown()`` before 0.3."""
        return self

    def set(self, service: str, status: int) -> None:
        """Report ``status`` (a ``ServingStatus`` number) for ``service``; ignored once the
        graceful shutdown began."""
        with self._changed:
            if self._record(service, status):
                self._changed.notify_all()

    def set_serving(self, serving: bool) -> None:
        """Report every registered service (and the server as a whole, ``""``) as (not) serving."""
        with self._changed:
            for service, status in self._statuses(serving):
                self.set(service, status)

    def enter_graceful_shutdown(self) -> None:
        """Permanently report NOT_SERVING, so clients and DNS stop sending new work."""
        with self._changed:
            if self._record_shutdown():
                self._changed.notify_all()

    def _check(self, service: str, context: grpc.ServicerContext) -> int:
        with self._changed:
            status = self.check_status(service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, UNKNOWN_SERVICE)
            raise AssertionError("unreachable: abort() raises")
        return status

    def _watch(self, service: str, context: grpc.ServicerContext) -> Iterator[int]:
        ended = threading.Event()

        def end() -> None:
            with self._changed:
                ended.set()
                self._changed.notify_all()

        if not context.add_callback(end):
            return  # the call is over already
        sent: int | None = None
        while True:
            with self._changed:
                while not ended.is_set() and self.watch_status(service) == sent:
                    self._changed.wait()
                if ended.is_set():
                    return
                sent = self.watch_status(service)
            yield sent


def add_health(server: grpc.Server, services: tuple[str, ...] = ()) -> PodHealth:
    """Serve ``grpc.health.v1.Health`` on ``server`` and flip it to NOT_SERVING on ``stop()``.

    ``Check`` and ``Watch`` answer for the server as a whole (``""``) and for each of
    ``services``, all SERVING until :meth:`PodHealth.set_serving` or :meth:`PodHealth.set`
    says otherwise; other names are NOT_FOUND (``Check``) or SERVICE_UNKNOWN (``Watch``).
    ``server.stop`` is wrapped so that the health status turns NOT_SERVING first, then the
    server's own graceful stop begins at once. That alone does not drain: a stopping server
    refuses new calls at once, and clients that have not re-checked health yet still send them
    (they fail CANCELLED). Stop a pod with :func:`drain` (or :func:`drain_on_signals`) instead.
    With the :class:`PodIdentityInterceptor` installed, health responses carry the pod identity
    too, which is how a client learns which pod a new connection reached.

    Args:
        server: a ``grpc.server``, before ``start()``.
        services: fully qualified service names to report besides the server as a whole.
    """
    pod_health = PodHealth(tuple(services))
    server.add_generic_rpc_handlers((health_handler(pod_health._check, pod_health._watch),))
    pod_health.set_serving(True)
    stop = server.stop

    def stop_after_flip(grace: float | None) -> threading.Event:
        pod_health.enter_graceful_shutdown()
        return stop(grace)  # type: ignore[no-any-return]

    server.stop = stop_after_flip
    return pod_health


def drain(
    server: grpc.Server, health: PodHealth, *, drain_s: float = DRAIN_S, grace_s: float = GRACE_S
) -> None:
    """Stop ``server`` the way clients can follow: NOT_SERVING, keep serving, then stop.

    Health reports NOT_SERVING at once; the server keeps serving every call for ``drain_s``
    (longer than the clients' health-check interval, so each has moved its calls elsewhere),
    then stops with ``grace_s`` for the calls still running. Returns once the server stopped.
    In Kubernetes: ``terminationGracePeriodSeconds`` > ``drain_s + grace_s``.
    """
    check_drain(drain_s, grace_s)
    health.enter_graceful_shutdown()
    threading.Event().wait(drain_s)
    server.stop(grace_s).wait()


def drain_on_signals(
    server: grpc.Server,
    health: PodHealth,
    *,
    drain_s: float = DRAIN_S,
    grace_s: float = GRACE_S,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> threading.Event:
    """On the first of ``signals`` (SIGTERM: what the kubelet sends), :func:`drain` in a thread.

    A second signal stops the server at once (a second Ctrl-C). Call from the main thread, as
    Python requires of signal handlers; ``server.wait_for_termination()`` returns once stopped.

    Returns:
        an event set once the server has stopped.
    """
    check_drain(drain_s, grace_s)
    stopped = threading.Event()
    started = threading.Lock()

    def run() -> None:
        try:
            drain(server, health, drain_s=drain_s, grace_s=grace_s)
        finally:
            stopped.set()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if started.acquire(blocking=False):
            _log.info("signal %d: draining for %.1f s, then stopping", signum, drain_s)
            threading.Thread(target=run, name="grpc-balance-drain", daemon=True).start()
        else:
            server.stop(None)

    for signum in signals:
        signal.signal(signum, on_signal)
    return stopped
