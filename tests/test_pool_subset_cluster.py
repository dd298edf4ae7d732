"""``PoolConfig.subset`` on the local cluster: a lane that reaches a pod reporting far more
client connections than the others (here: many direct connections to it, which its load
report counts) is redialled elsewhere."""

from __future__ import annotations

import grpc
import pytest
from conftest import require
from fault_load import wait_for

from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.pool import PoolConfig, rotate_after_age
from grpc_balance_mw.subset import SubsetRule
from grpc_balance_mw.testing import LocalCluster, missing_components
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

CROWD = 24  # connections held straight to the crowded pod (it counts each one's address)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_lane_on_a_pod_reporting_many_connections_is_redialled_elsewhere() -> None:
    require(not missing_components(), "; ".join(missing_components()))
    with LocalCluster(3, dns=None, l7=None) as cluster:
        crowded = cluster.pods[0]
        own = [("grpc.use_local_subchannel_pool", 1)]  # else the channels share one connection
        crowd = [grpc.insecure_channel(crowded.address, options=own) for _ in range(CROWD)]
        config = PoolConfig(min_lanes=2, max_lanes=2, expected_pods=3, subset=SubsetRule())
        # Lanes rotate every second or so: each replacement is a fresh random pick of a pod.
        channel = balanced_channel(
            cluster.service_target, pool_config=config, rotation=rotate_after_age(1.0)
        )
        stub = pb_grpc.ChargePointsStub(channel)  # type: ignore[no-untyped-call]

        def crowd_and_call() -> None:
            for other in crowd:  # each call keeps that connection counted by the pod
                pb_grpc.ChargePointsStub(other).GetChargePoint(  # type: ignore[no-untyped-call]
                    pb.GetChargePointRequest(id="crowd"), timeout=5
                )
            stub.GetChargePoint(pb.GetChargePointRequest(id="cp"), timeout=5)

        def moved_off() -> bool:
            crowd_and_call()
            pods = {lane.pod for lane in channel.pool.lanes if lane.is_available()}
            return channel.pool.crowded >= 1 and crowded.name not in pods and len(pods) == 2

        try:
            assert wait_for(moved_off, timeout_s=60), (channel.pool, channel.pool.load_book)
            report = channel.pool.load_book.get(crowded.name, channel.pool.clock())
            assert report is not None and report.connections >= CROWD
        finally:
            channel.close()
            for other in crowd:
                other.close()
