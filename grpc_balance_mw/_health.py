"""What the sync and aio ``PodHealth`` share: the services reported and the serving state."""

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
