from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from grpc_balance_mw import server as sync_server
from grpc_balance_mw.aio import server as aio_server
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.testing.charge_points.servicer import (
    SERVICE_NAME,
    ChargePointsServicer,
    SyncChargePointsServicer,
)
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from redial_fixtures import Driver

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["grpc_balance_mw.testing.pytest_plugin"]

IDENTITY = PodIdentity(name="charge-points-7d9f-abcde", ip="10.244.1.7", namespace="ev")


def require(condition: bool, reason: str) -> None:
    """Skip when a component is missing; under CI=true that is a failure instead."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required component missing in CI: {reason}")
    pytest.skip(reason)


class SyncPod:
    """A sync charge-points server on loopback with the identity middleware and health."""

    def __init__(self, identity: PodIdentity = IDENTITY) -> None:
        self.server = grpc.server(
            ThreadPoolExecutor(8), interceptors=[sync_server.PodIdentityInterceptor(identity)]
        )
        self.servicer = SyncChargePointsServicer(identity.name)
        pb_grpc.add_ChargePointsServicer_to_server(self.servicer, self.server)
        self.health = sync_server.add_health(self.server, services=(SERVICE_NAME,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"


class AioPod:
    def __init__(self, identity: PodIdentity = IDENTITY) -> None:
        self.identity = identity

    async def start(self) -> AioPod:
        self.server = grpc.aio.server(
            interceptors=[aio_server.PodIdentityInterceptor(self.identity)]
        )
        self.servicer = ChargePointsServicer(self.identity.name)
        pb_grpc.add_ChargePointsServicer_to_server(self.servicer, self.server)
        self.health = await aio_server.add_health(self.server, services=(SERVICE_NAME,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        return self


@pytest.fixture
def sync_pod() -> Iterator[SyncPod]:
    pod = SyncPod()
    yield pod
    pod.server.stop(None).wait()


@pytest.fixture
async def aio_pod() -> AsyncIterator[AioPod]:
    pod = await AioPod().start()
    yield pod
    await pod.server.stop(None)


@pytest.fixture(params=["sync", "aio"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    """A dial-per-request channel driven sync and aio (``redial_fixtures.Driver``)."""
    from redial_fixtures import Driver

    made = Driver(request.param)
    yield made
    made.finish()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The leak check runs last, after every test that starts processes or namespaces."""
    items.sort(key=lambda item: item.path.name == "test_cluster_teardown.py")  # stable sort
