"""What the sync and aio ``PodHealth`` share: the services reported, the serving state, and the
timing of a drain."""

from __future__ import annotations

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.health_check import NOT_SERVING, SERVING


class HealthReport:
    """The statuses a pod's health service reports; the adapters only send them."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = services
        self._serving = False
        self._shutting_down = False

    def _statuses(self, serving: bool) -> list[tuple[str, int]]:
        """Record ``serving`` and return the (service, status) pairs to set, ``""`` first."""
        self._serving = serving
        status = SERVING if serving else NOT_SERVING
        return [(service, status) for service in ("", *self.services)]

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


def require_health_checking() -> None:
    """Raise a clear error when grpcio-health-checking (the ``server`` extra) is missing.

    It is not a core dependency: grpcio-health-checking N requires grpcio >= N, so declaring it
    would upgrade the grpcio an application pinned. Clients need none of it.
    """
    try:
        import grpc_health.v1.health  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "add_health() serves grpc.health.v1 with grpcio-health-checking, which is not "
            "installed: pip install 'grpc_balance_mw[server]' (or grpcio-health-checking "
            "matching your grpcio)"
        ) from None
