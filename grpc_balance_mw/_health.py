"""What the sync and aio ``PodHealth`` share: the services reported and the serving state."""

from __future__ import annotations

from grpc_health.v1 import health_pb2


class HealthReport:
    """The statuses a pod's health service reports; the adapters only send them."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = services
        self._serving = False
        self._shutting_down = False

    def _statuses(self, serving: bool) -> list[tuple[str, int]]:
        """Record ``serving`` and return the (service, status) pairs to set, ``""`` first."""
        self._serving = serving
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return [(service, status) for service in ("", *self.services)]

    @property
    def serving(self) -> bool:
        """What the health service reports now (False from the start of a graceful shutdown)."""
        return self._serving and not self._shutting_down

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down
