"""``PoolConfig.subset`` on the local cluster: a lane that reaches a pod reporting far more
client connections than the others (here: many direct connections to it, which its load
report counts) is redialled elsewhere."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from conftest import require
from fault_load import wait_for

from grpc_balance_mw import aio
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.pool import LanePool, PoolConfig, rotate_after_age
from grpc_balance_mw.subset import SubsetRule
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

CROWD = 24  # connections held straight to the crowded pod (it counts each one's address)
OWN = [("grpc.use_local_subchannel_pool", 1)]  # else the channels share one connection
CONFIG = PoolConfig(min_lanes=2, max_lanes=2, expected_pods=3, subset=SubsetRule())
#: Lanes rotate every second or so: each replacement is a fresh random pick of a pod.
ROTATION = rotate_after_age(1.0)


def moved_off(pool: LanePool, crowded: str) -> bool:
    """A lane reached ``crowded`` and heard its count, a lane was redialled or rotated away
    from a crowded pod, and none is on ``crowded``."""
    report = pool.load_book.get(crowded, pool.clock())
    pods = {lane.pod for lane in pool.lanes if lane.is_available()}
    return (
        report is not None
        and report.connections >= CROWD
        and pool.crowded >= 1
        and crowded not in pods
        and len(pods) == 2
    )


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_lane_on_a_pod_reporting_many_connections_is_redialled_elsewhere() -> None:
    require(not missing_components(), "; ".join(missing_components()))
    with LocalCluster(3, dns=None, l7=None) as cluster:
        crowded = cluster.pods[0]
        crowd = [grpc.insecure_channel(crowded.address, options=OWN) for _ in range(CROWD)]
        channel = balanced_channel(cluster.service_target, pool_config=CONFIG, rotation=ROTATION)
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]

        def crowd_and_call() -> None:
            for other in crowd:  # each call keeps that connection counted by the pod
                pb_grpc.ChargePointsStub(other).GetChargePoint(  # type: ignore[no-untyped-call]
                    pb.GetChargePointRequest(id="crowd"), timeout=5
                )
            stub.GetChargePoint(pb.GetChargePointRequest(id="cp"), timeout=5)

        def called_and_moved_off() -> bool:
            crowd_and_call()
            return moved_off(channel.pool, crowded.name)

        try:
            assert wait_for(called_and_moved_off, timeout_s=60), channel.pool
        finally:
            channel.close()
            for other in crowd:
                other.close()


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_the_asyncio_channel_moves_off_a_crowded_pod_too() -> None:
    require(not missing_components(), "; ".join(missing_components()))
    with LocalCluster(3, dns=None, l7=None) as cluster:
        crowded = cluster.pods[0]
        crowd = [grpc.aio.insecure_channel(crowded.address, options=OWN) for _ in range(CROWD)]
        channel = aio.balanced_channel(
            cluster.service_target, pool_config=CONFIG, rotation=ROTATION
        )
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]
        request = pb.GetChargePointRequest(id="cp")
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not moved_off(channel.pool, crowded.name):
                for other in crowd:
                    await pb_grpc.ChargePointsStub(other).GetChargePoint(  # type: ignore[no-untyped-call]
                        request, timeout=5
                    )
                await stub.GetChargePoint(request, timeout=5)
                await asyncio.sleep(0.02)  # pacing: the channel's maintenance runs meanwhile
            assert moved_off(channel.pool, crowded.name), channel.pool
        finally:
            await channel.close()
            for other in crowd:
                await other.close()
