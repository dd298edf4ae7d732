"""pytest plugin: a ``local_cluster`` fixture, torn down after each test even when it fails.

Enable it in a ``conftest.py``::

    pytest_plugins = ["grpc_balance_mw.testing.pytest_plugin"]

Then::

    @pytest.mark.local_cluster(pods=3, service="haproxy", dns="dnsmasq")
    def test_spread(local_cluster: LocalCluster) -> None:
        channel = grpc.insecure_channel(local_cluster.service_target)

The marker takes :class:`LocalCluster`'s arguments. ``local_cluster_factory`` starts as many
clusters as a test wants, each configured by its call. A cluster whose parts are not installed
here (HAProxy, dnsmasq, root for the iptables backend) is skipped with the reason, except under
``CI=true``, where that is a failure: a CI that silently skips its cluster tests proves nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from grpc_balance_mw.testing.cluster import LocalCluster, missing_components

__all__ = ["local_cluster", "local_cluster_factory", "require_components"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "local_cluster(**kwargs): LocalCluster arguments for the local_cluster fixture",
    )


def require_components(**kwargs: Any) -> None:
    """Skip (fail under ``CI=true``) unless this machine has what such a cluster needs."""
    wanted = {key: kwargs[key] for key in ("service", "dns", "l7") if key in kwargs}
    missing = missing_components(**wanted)
    if not missing:
        return
    reason = "local cluster: " + "; ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(f"required component missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def local_cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
    """Call it with :class:`LocalCluster`'s arguments; every cluster it started is stopped."""
    started: list[LocalCluster] = []

    def start(**kwargs: Any) -> LocalCluster:
        require_components(**kwargs)
        cluster = LocalCluster(**kwargs)
        started.append(cluster)
        return cluster.start()

    try:
        yield start
    finally:
        for cluster in reversed(started):
            cluster.stop()


@pytest.fixture
def local_cluster(
    request: pytest.FixtureRequest, local_cluster_factory: Callable[..., LocalCluster]
) -> LocalCluster:
    """A running cluster configured by the test's ``local_cluster`` marker (default: 3 pods)."""
    marker = request.node.get_closest_marker("local_cluster")
    return local_cluster_factory(**(marker.kwargs if marker is not None else {}))
