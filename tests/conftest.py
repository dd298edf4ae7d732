from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
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

from leak_fixtures import (  # noqa: E402  (tests/ is on sys.path now)
    Snapshot,
    check_no_leaks,
    server_with_own_workers,
    short_idle_workers,
)

IDENTITY = PodIdentity(name="charge-points-7d9f-abcde", ip="10.244.1.7", namespace="ev")


def require(condition: bool, reason: str) -> None:
    """Skip when a component is missing; under CI=true that is a failure instead."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required component missing in CI: {reason}")
    pytest.skip(reason)


class SyncPod:
    """A sync charge-points server on loopback with the identity middleware and health.

    ``stop()`` also ends its executor's threads: grpc leaves them to the collector, and a log
    record or traceback that holds the server keeps them past the test.
    """

    def __init__(self, identity: PodIdentity = IDENTITY) -> None:
        self.server = server_with_own_workers(
            8, interceptors=[sync_server.PodIdentityInterceptor(identity)]
        )
        self.servicer = SyncChargePointsServicer(identity.name)
        pb_grpc.add_ChargePointsServicer_to_server(self.servicer, self.server)
        self.health = sync_server.add_health(self.server, services=(SERVICE_NAME,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None).wait()  # and its workers end


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


@pytest.fixture(scope="session", autouse=True)
def idle_workers_end_soon() -> Iterator[None]:
    """The package's idle-ending threads end within the leak check's wait (leak_fixtures.py)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        short_idle_workers(monkeypatch)
        yield


@pytest.fixture(scope="module", autouse=True)
def no_leaks_per_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """A ``leaks_per_module`` module is checked as a whole, after its shared fixtures end."""
    marker = request.node.get_closest_marker("leaks_per_module")
    if marker is None:
        yield
        return
    if not marker.kwargs.get("reason"):
        pytest.fail("@pytest.mark.leaks_per_module needs a reason=", pytrace=False)
    before = Snapshot.take()
    yield
    check_no_leaks(request, before)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves a thread, child process or socket behind (leak_fixtures.py)."""
    if request.node.get_closest_marker("leaks_per_module") is not None:
        yield  # checked with its module (no_leaks_per_module)
        return
    before = Snapshot.take()
    yield
    check_no_leaks(request, before)


@pytest.fixture
def sync_pod() -> Iterator[SyncPod]:
    pod = SyncPod()
    yield pod
    pod.stop()


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


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``heavy`` (the old name) is ``slow``; the cluster leak check runs after every other test."""
    for item in items:
        if item.get_closest_marker("heavy") is not None:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.path.name == "test_cluster_teardown.py")  # stable sort


FAST_TIER_WARN_S = 3.0
"""A test outside ``slow`` and ``cluster`` that takes this long is named at the end of the run."""


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Name the fast-tier tests that took long, so their markers keep following their cost.

    A warning, not a failure: timings on a shared machine are not assertions.
    """
    spent: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if not isinstance(report, pytest.TestReport):
                continue
            if "slow" in report.keywords or "cluster" in report.keywords:
                continue
            spent[report.nodeid] = spent.get(report.nodeid, 0.0) + report.duration
    long = sorted(((s, n) for n, s in spent.items() if s >= FAST_TIER_WARN_S), reverse=True)
    if long:
        terminalreporter.section(f"fast-tier tests over {FAST_TIER_WARN_S:g} s")
        terminalreporter.line("mark them @pytest.mark.slow if they take as long on a quiet machine")
        for seconds, nodeid in long:
            terminalreporter.line(f"{seconds:6.1f} s  {nodeid}")
