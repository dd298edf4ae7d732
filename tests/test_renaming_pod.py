"""One pod that stamps a new identity on every call, among pods that keep theirs, through the
balanced channel, sync and aio, on real servers. Each lane's connection goes to a pod drawn at
random (what kube-proxy does per connection), by the channel's own factory.

Before, each scout that reached it found "a new pod": its names filled ``max_lanes``, it took
most of the traffic, and the detector's per-request verdict (``l7-balanced``) stopped the scouting
that finds a scale-up's pods. Every count is the pods' own.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import SyncPod
from fault_load import MODES, close_channel, covered, until
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import server as sync_server
from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio.balanced import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME, SyncChargePointsServicer
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

CALLS = 300


def identity(name: str) -> PodIdentity:
    return PodIdentity(name, "10.244.1.7", "ev")


class RenamingIdentity(sync_server.PodIdentityInterceptor):
    """Stamps a new pod name on every call (a bug, or a hostile server)."""

    def __init__(self) -> None:
        self._names = itertools.count()
        super().__init__(identity("renaming-0"))

    @property  # type: ignore[override]
    def _stamp(self) -> Any:
        return identity(f"renaming-{next(self._names)}").to_metadata()

    @_stamp.setter
    def _stamp(self, _value: Any) -> None:
        pass


class RenamingPod:
    def __init__(self) -> None:
        self.server = server_with_own_workers(8, interceptors=[RenamingIdentity()])
        self.servicer = SyncChargePointsServicer("renaming")
        pb_grpc.add_ChargePointsServicer_to_server(self.servicer, self.server)
        sync_server.add_health(self.server, services=(SERVICE_NAME,))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


@pytest.fixture
def pods() -> Iterator[tuple[list[Any], SyncPod]]:
    """Two pods that keep their names and one that renames itself; and one more pod, for a
    scale-up."""
    made: list[Any] = [SyncPod(identity("pod-a")), SyncPod(identity("pod-b")), RenamingPod()]
    spare = SyncPod(identity("pod-c"))
    try:
        yield made, spare
    finally:
        for pod in [*made, spare]:
            pod.server.stop(None).wait()


class KubeProxy:
    """The lanes' factory: each new connection goes to one of ``targets``, drawn at random."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self._rng = random.Random()

    def sync(self, extra: Any) -> grpc.Channel:
        return grpc.insecure_channel(self._rng.choice(self.targets), options=extra)

    def aio(self, extra: Any, interceptors: Any) -> grpc.aio.Channel:
        target = self._rng.choice(self.targets)
        return grpc.aio.insecure_channel(target, options=extra, interceptors=interceptors)


@pytest.mark.parametrize("mode", MODES)
def test_a_pod_that_renames_itself_takes_no_lane_and_blocks_no_scale_up(
    pods: tuple[list[Any], SyncPod], mode: str
) -> None:
    (good_a, good_b, renaming), spare = pods
    proxy = KubeProxy([pod.target for pod in (good_a, good_b, renaming)])
    observe = ObserveOptions(registry=AffinityRegistry())

    async def main() -> tuple[int, bool, str]:
        if mode == "sync":
            channel: Any = balanced_channel("svc:50051", factory=proxy.sync, observe=observe)
        else:
            channel = aio_balanced_channel("svc:50051", factory=proxy.aio, observe=observe)
        try:
            # Scouts (4 a second) meet the renaming pod several times over, each time it names
            # itself anew.
            assert await until(lambda: channel.pool.dials >= 20, 15), channel
            assert await until(lambda: covered(channel) == {"pod-a", "pod-b"}), channel.pool.lanes

            async def one_call() -> None:
                if mode == "sync":
                    seen = await asyncio.to_thread(call_sync, channel, "unary_unary")
                else:
                    seen = await call_aio(channel, "unary_unary")
                assert seen.code is grpc.StatusCode.OK

            before = renaming.servicer.calls.total()
            for _ in range(CALLS):
                await one_call()
            taken = renaming.servicer.calls.total() - before
            proxy.targets.append(spare.target)  # a scale-up: the scouts must find it
            # Calls go on, as the scale-up bound is stated (an idle channel's scouts back off).
            deadline = time.monotonic() + 20
            found = False
            for _ in range(20_000):
                found = "pod-c" in covered(channel)
                if found or time.monotonic() > deadline:
                    break
                await one_call()
            return taken, found, repr(channel)
        finally:
            await close_channel(mode, channel)

    taken, found, summary = asyncio.run(main())
    # A lane on it is drained as soon as lanes with named pods exist: none of these calls
    # should reach it. (Before: most of them.)
    assert taken == 0, (taken, summary)
    assert found, summary
