"""A fleet that names its pods in a header of its own (``ObserveOptions.pod_headers``): the
balanced channel's lanes learn their pods from their health checks in that header, so the pool
covers every pod instead of balancing blind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from fault_load import MODES, close_channel, covered, open_channel, until

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import PoolConfig
from grpc_balance_mw.testing import LocalCluster

pytestmark = [pytest.mark.cluster]

Factory = Callable[..., LocalCluster]


@pytest.mark.parametrize("mode", MODES)
def test_lanes_learn_their_pods_from_the_fleets_own_header(
    local_cluster_factory: Factory, mode: str
) -> None:
    cluster = local_cluster_factory(pods=3, identity_header="x-pod-name")
    pods = {pod.name for pod in cluster.pods}

    async def main() -> None:
        channel: Any = open_channel(
            mode,
            "balanced",
            cluster.service_target,
            pool_config=PoolConfig(expected_pods=3, scout_interval_s=0.05),
            observe=ObserveOptions(
                registry=AffinityRegistry(), pod_headers=("x-pod-name",), probe=False
            ),
        )
        try:
            assert await until(lambda: covered(channel) == pods, 20), channel
        finally:
            await close_channel(mode, channel)

    asyncio.run(main())
