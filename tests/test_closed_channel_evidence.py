"""A closed channel's calls are not the evidence of a channel opened after it, sync and aio.

One plain channel through an L4 Service is pinned (rightly); it is closed; a balanced channel to
the same target, in the same registry, must start out judged by its own calls only: never
pinned or skewed while the pods' own counts are even. What the detector learnt of the target
itself (the pods known) stays.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from affinity_fixtures import NO_WARMUP
from calls import call_aio, call_sync
from conftest import require
from fault_load import covered, until

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.aio.observed_channel import observe as aio_observe
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions, build_observer, detector_for
from grpc_balance_mw.pool import PoolConfig
from grpc_balance_mw.testing import LocalCluster, missing_components

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.leaks_per_module(
        reason="a module-scoped local cluster: its admin connections live as long as it does"
    ),
]

PLAIN_CALLS, BALANCED_CALLS = 60, 150
ALARMS = (AffinityState.PINNED, AffinityState.SKEWED)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        yield running


class Client:
    """The same calls, plain then balanced, through the sync or the aio channels."""

    def __init__(self, mode: str, target: str, options: ObserveOptions) -> None:
        self.mode, self.target, self.options = mode, target, options

    async def calls(self, channel: Any, count: int) -> list[grpc.StatusCode]:
        if self.mode == "sync":
            return await asyncio.to_thread(
                lambda: [call_sync(channel, "unary_unary").code for _ in range(count)]
            )
        return [(await call_aio(channel, "unary_unary")).code for _ in range(count)]

    def plain(self) -> Any:
        if self.mode == "sync":
            return observe(grpc.insecure_channel(self.target), self.options)
        return aio_observe(grpc.aio.insecure_channel(self.target), self.options)

    def balanced(self) -> Any:
        factory = balanced_channel if self.mode == "sync" else aio_balanced_channel
        return factory(self.target, observe=self.options, pool_config=PoolConfig(expected_pods=3))

    async def close(self, channel: Any) -> None:
        if self.mode == "sync":
            channel.close()
        else:
            await channel.close()


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_a_closed_plain_channels_pinning_is_not_a_new_balanced_channels(
    cluster: LocalCluster, mode: str
) -> None:
    registry = AffinityRegistry()
    options = ObserveOptions(registry=registry, expected_pods=3)
    client = Client(mode, cluster.service_target, options)

    async def main() -> None:
        plain = client.plain()
        try:
            assert set(await client.calls(plain, PLAIN_CALLS)) == {grpc.StatusCode.OK}
            assert plain.detector.state is AffinityState.PINNED, plain.detector  # rightly
        finally:
            await client.close(plain)
        detector = registry.detector(cluster.service_target)
        known = set(detector.snapshot().known_pods)
        cluster.reset_counts()
        balanced = client.balanced()
        try:
            assert balanced.detector is detector  # one detector per target, as before
            assert detector.state not in ALARMS, detector  # not the closed channel's verdict
            assert set(detector.snapshot().known_pods) >= known  # what it knew of the pods
            assert await until(lambda: len(covered(balanced)) == 3), balanced
            states = []
            for _ in range(BALANCED_CALLS // 10):
                assert set(await client.calls(balanced, 10)) == {grpc.StatusCode.OK}
                states.append(detector.state)
        finally:
            await client.close(balanced)
        served = cluster.served()
        assert sorted(served) == sorted(p.name for p in cluster.pods), served
        assert min(served.values()) >= BALANCED_CALLS // 6, served  # even, by the pods' count
        assert not set(states) & set(ALARMS), states

    asyncio.run(main())


def test_only_the_calls_of_closed_observers_are_forgotten_and_the_pods_stay() -> None:
    options = ObserveOptions(registry=AffinityRegistry(NO_WARMUP), expected_pods=3)
    target = "charge-points.ev.svc:80"
    first, second = build_observer(target, options), build_observer(target, options)
    detector = first.detector
    for _ in range(40):
        detector.record("pod-a", lane=first.lane_evidence)
    detector.add_known_pods(["pod-a", "pod-b", "pod-c"])
    assert detector.state is AffinityState.PINNED
    first.close()
    detector_for(target, options)  # another channel still feeds it: its evidence stands
    assert detector.state is AffinityState.PINNED
    del second  # collected without close(): detached all the same
    gc.collect()
    assert detector.state is AffinityState.PINNED  # read after the close: still there
    detector_for(target, options)  # a channel opened after they all went
    snapshot = detector.snapshot()
    assert snapshot.state is AffinityState.UNVERIFIED and snapshot.calls == 0, snapshot
    assert "pod-a" in snapshot.known_pods
    first.close()  # twice: detached once
    detector_for(target, options)
    assert "pod-a" in detector.snapshot().known_pods
