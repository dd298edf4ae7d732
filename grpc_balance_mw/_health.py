"""What the sync and aio ``PodHealth`` share: the statuses served, the answers to ``Check`` and
``Watch``, and the timing of a drain.

The service is ``grpc.health.v1.Health`` as grpcio-health-checking's ``HealthServicer`` serves
it (the same answers, the same ``set()``/``enter_graceful_shutdown()``), on generic method
handlers with the messages encoded by :mod:`grpc_balance_mw.health_check`: serving it needs
neither grpcio-health-checking nor protobuf, whose releases require a grpcio at least as new as
themselves and would upgrade the grpcio an application pinned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.health_check import (
    HEALTH_SERVICE,
    NOT_SERVING,
    SERVICE_UNKNOWN,
    SERVING,
    decode_request,
    encode_status,
)

#: The server as a whole, in ``HealthCheckRequest.service``.
OVERALL = ""


class HealthReport:
    """The statuses a pod's health service reports; the adapters serve them and wake watchers.

    Not locked: the sync adapter changes it under its condition's lock, the aio one on its loop.
    """

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = services
        self._status: dict[str, int] = {OVERALL: SERVING}
        self._serving = False
        self._shutting_down = False

    def _statuses(self, serving: bool) -> list[tuple[str, int]]:
        """Record ``serving`` and return the (service, status) pairs to set, ``""`` first."""
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        return [(service, status) for service in (OVERALL, *self.services)]

    def _record(self, service: str, status: int) -> bool:
        """Take ``status`` for ``service``; False (ignored) once the shutdown began."""
        if self._shutting_down:
            return False
        self._status[service] = status
        return True

    def _record_shutdown(self) -> bool:
        """Every service known NOT_SERVING, for good; False if that happened already."""
        if self._shutting_down:
            return False
        for service in self._status:
            self._status[service] = NOT_SERVING
        self._shutting_down = True
        return True

    def check_status(self, service: str) -> int | None:
        """What ``Check`` answers for ``service``: None for one never set (NOT_FOUND)."""
        return self._status.get(service)

    def watch_status(self, service: str) -> int:
        """What ``Watch`` streams for ``service``: SERVICE_UNKNOWN until it is set."""
        return self._status.get(service, SERVICE_UNKNOWN)

    @property
    def serving(self) -> bool:
        """What the health service reports now (False from the start of a graceful shutdown)."""
        return self._serving and not self._shutting_down

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down


#: How long a draining pod keeps serving after it reports NOT_SERVING. A balanced channel
#: re-checks each lane's pod every ``PoolConfig.health_interval_s`` (5 s), a check may take its
#: deadline (``check_timeout_s``, 1 s) plus ``CHECK_GRACE_S`` (1 s), and the maintenance thread
#: wakes every ``tick_s`` (0.25 s): a client learns of the flip at most 7.25 s after it. 10 s
#: leaves room for a slow client; raise it with the clients' ``health_interval_s``.
DRAIN_S = 10.0

#: The graceful stop after the drain: calls still running (long streams) get this long to finish.
#: ``DRAIN_S + GRACE_S`` = 25 s stays under Kubernetes' default terminationGracePeriodSeconds (30).
GRACE_S = 15.0


def check_drain(drain_s: float, grace_s: float) -> None:
    """Refuse a drain that cannot be served (negative periods)."""
    if drain_s < 0 or grace_s < 0:
        raise ConfigurationError(f"need drain_s >= 0 and grace_s >= 0, got {drain_s}, {grace_s}")


#: The details of ``Check``'s NOT_FOUND, as grpc-go words them.
UNKNOWN_SERVICE = "unknown service"


def health_handler(check: Callable[..., Any], watch: Callable[..., Any]) -> grpc.GenericRpcHandler:
    """``grpc.health.v1.Health`` with ``check`` and ``watch`` (sync or aio behaviours) taking
    the service name and answering status numbers; the messages are encoded by hand."""
    return grpc.method_handlers_generic_handler(
        HEALTH_SERVICE,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check, request_deserializer=decode_request, response_serializer=encode_status
            ),
            "Watch": grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=decode_request, response_serializer=encode_status
            ),
        },
    )
