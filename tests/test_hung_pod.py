"""A hung pod (SIGSTOP: the kernel keeps accepting its connections, nothing answers) under load
through the balanced channel, sync and aio, against the local cluster.

Its lane must stop taking calls as soon as its first call passes its deadline while the other
lanes answer. Before, its stuck calls expired together, its in-flight count dropped to 0 and the
picker sent it a fresh burst, once per deadline, until two periodic health checks (5 s apart)
had gone unanswered. Every count is what the callers saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from conftest import require
from fault_load import MODES, OK, close_channel, covered, hung, load, open_channel, until

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import PoolConfig
from grpc_balance_mw.testing import LocalCluster, missing_components

pytestmark = [pytest.mark.cluster, pytest.mark.heavy]

CONCURRENCY = 8
TIMEOUT_S = 0.5
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    # 20 ms a call: 8 callers keep ~2-3 calls in flight per lane, and 1,000 calls take several
    # of the calls' deadlines, so a lane that got a fresh burst after each expiry would show it.
    with LocalCluster(pods=3, service="userspace", dns=None, service_time_ms=20) as running:
        yield running


@pytest.mark.parametrize("mode", MODES)
def test_a_hung_pods_lane_takes_no_call_after_its_first_expires(
    cluster: LocalCluster, mode: str
) -> None:
    victim = cluster.pods[2].name

    async def main() -> tuple[list[grpc.StatusCode], bool, str]:
        channel = open_channel(
            mode, "balanced", cluster.service_target,
            observe=ObserveOptions(expected_pods=3, registry=AffinityRegistry()),
            pool_config=PoolConfig(expected_pods=3),  # periodic checks every 5 s, the default
        )  # fmt: skip
        try:
            assert await until(lambda: len(covered(channel)) == 3), channel
            with hung(cluster, victim):
                outcomes = await load(
                    mode, channel, "unary_unary", 1000, CONCURRENCY, timeout=TIMEOUT_S
                )
                gone = await until(lambda: victim not in covered(channel), 15)
            return [o.code for o in outcomes], gone, repr(channel)
        finally:
            await close_channel(mode, channel)

    codes, gone, summary = asyncio.run(main())
    assert set(codes) <= {OK, DEADLINE_EXCEEDED}, summary
    # Only the calls in flight on its lane when the first of them expired can be lost: at most
    # one per caller. (Before: a burst of 2-4 more after every expiry, 20 or so in all.)
    assert codes.count(DEADLINE_EXCEEDED) <= CONCURRENCY, (codes.count(DEADLINE_EXCEEDED), summary)
    assert gone, summary  # its lane was drained: its check went unanswered
