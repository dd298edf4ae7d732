"""What a lane's health check says, read the same way by the sync and asyncio channels."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from grpc_balance_mw.errors import MalformedPodHeader
from grpc_balance_mw.health_check import MALFORMED, MAX_REPLY_BYTES, OVERSIZED, SERVING
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS, pod_name_from_metadata
from grpc_balance_mw.orca import GRPCIO_TRAILER_KEY, MalformedLoadReport, decode_load_report
from grpc_balance_mw.pool.pool import CheckResult

__all__ = [
    "CHECK_GRACE_S",
    "UNREACHED",
    "CheckFaults",
    "names_a_pod",
    "read_check",
    "read_reply",
]

Metadata = Iterable[tuple[str, Any]] | None


def _pod(metadata: Metadata, headers: tuple[str, ...] = DEFAULT_POD_HEADERS) -> str | None:
    try:
        return pod_name_from_metadata(metadata or (), headers)
    except MalformedPodHeader:
        return None


def _connections(metadata: Metadata) -> float | None:
    """The client connections the pod reported in its load report (``PoolConfig.subset``
    weighs them), None without one. A malformed report is ignored: it is no reason to doubt
    the health check it came with."""
    for key, value in metadata or ():
        if key != GRPCIO_TRAILER_KEY or not isinstance(value, bytes):
            continue
        try:
            report = decode_load_report(value)
        except MalformedLoadReport:
            return None
        return report.named_metrics.get("connections")
    return None


#: What a lane whose connection could not be opened or checked reports: no pod reached. The
#: pool retires the lane and backs off its next dial, so the next round heals.
UNREACHED = CheckResult(False)


class CheckFaults:
    """Logs why lanes could not be opened or checked: each cause once per channel as a warning
    (with its traceback, if an exception), then at debug level. A fault that repeats on every
    round (a factory whose certificate file is missing, a pod that answers health checks with
    garbage) would otherwise log a line per scout, several a second.

    Args:
        log: the adapter's logger.
        target: the channel's target, for the messages.
    """

    def __init__(self, log: logging.Logger, target: str) -> None:
        self._log = log
        self._target = target
        self._seen: set[str] = set()

    def note(self, lane: Any, cause: str, error: BaseException | None = None) -> CheckResult:
        """Log ``cause`` for ``lane`` (once per cause at warning level); returns
        :data:`UNREACHED`, what the pool is told."""
        first = cause not in self._seen
        self._seen.add(cause)
        self._log.log(
            logging.WARNING if first else logging.DEBUG,
            "balanced channel %s: %r: %s%s",
            self._target,
            lane,
            cause,
            " (logged once per cause; later ones at debug level)" if first else "",
            exc_info=error if first else None,
        )
        return UNREACHED

    def seen(self, lane: Any, result: CheckResult) -> CheckResult:
        """``result`` as it is, its :attr:`~CheckResult.fault` logged (see :meth:`note`)."""
        if result.fault is not None:
            self.note(lane, result.fault)
        return result

    def failed(self, lane: Any, error: BaseException) -> CheckResult:
        """``lane`` could not be opened or checked because of ``error``; see :meth:`note`."""
        return self.note(lane, f"could not open or check it: {type(error).__name__}", error)


#: How long past its own deadline a lane's health check is waited for before it counts as a
#: pod not reached and is cancelled (gRPC ends it at its deadline; this bounds the wait should
#: it not).
CHECK_GRACE_S = 1.0


def read_check(
    status: str,
    serving: bool,
    initial: Metadata = None,
    trailing: Metadata = None,
    headers: tuple[str, ...] = DEFAULT_POD_HEADERS,
) -> CheckResult:
    """A ``grpc.health.v1`` check's outcome as the pool needs it.

    Args:
        status: the call's status code name (``"OK"``, ``"UNAVAILABLE"``, ...).
        serving: the response said SERVING (only meaningful with ``"OK"``).
        initial: the response's initial metadata, where the pod names itself.
        trailing: its trailing metadata (an error status carries the pod only there).
        headers: the headers that name the pod (``ObserveOptions.pod_headers``).
    """
    pod = _pod(initial, headers) or _pod(trailing, headers)
    if status == "OK":
        return CheckResult(True, pod, serving, connections=_connections(trailing))
    if status == "UNIMPLEMENTED":  # a server without the health service was still reached
        return CheckResult(True, pod, True, connections=_connections(trailing))
    # Any other error: reached only if a pod named itself, and then it is not serving.
    return CheckResult(pod is not None, pod, False)


def read_reply(
    reply: int,
    initial: Metadata = None,
    trailing: Metadata = None,
    headers: tuple[str, ...] = DEFAULT_POD_HEADERS,
) -> CheckResult:
    """A check answered OK with ``reply`` (from ``check_method(channel, lenient=True)``). A
    reply that is no health status is not a pod's answer: the connection does not count as
    reaching a pod, whatever pod its metadata names."""
    if reply == MALFORMED:
        return CheckResult(False, fault="its health reply is no HealthCheckResponse: not a pod")
    if reply == OVERSIZED:
        return CheckResult(
            False, fault=f"its health reply is over {MAX_REPLY_BYTES} bytes: not a pod"
        )
    return read_check("OK", reply == SERVING, initial, trailing, headers)


def names_a_pod(trailing: Metadata) -> bool:
    """Whether a failed call's trailing metadata names the pod that sent the status: the pod
    answered (it is alive and its connection works), as opposed to a status made up by the
    client's transport when a connection or a pod is gone."""
    return _pod(trailing) is not None
