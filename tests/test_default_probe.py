"""``observe()`` with no options learns the pods behind a ClusterIP: the default probe.

Issue 21: with default options a channel pinned 100% through a ClusterIP stayed ``unverified``
and ``observe(..., rebalance=Rebalance(...))`` never moved. Now a probe round of fresh
connections runs when the channel is made (then every 5 minutes, one schedule per target), so
the pinned alarm comes within 50 back-to-back calls and Rebalance moves. The probe dials in
plaintext only a target that showed it speaks plaintext HTTP/2 (tests/test_probe_tls.py: a TLS
target is never sent plaintext). Real pods on loopback (the local cluster), sync and aio.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import SyncPod, require
from fault_load import until

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.aio import channel_factory as aio_channel_factory
from grpc_balance_mw.aio.observed_channel import observe as aio_observe
from grpc_balance_mw.balanced import channel_factory
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import AUTO_PROBE_INTERVAL_S, ObserveOptions
from grpc_balance_mw.probe import PodProbe, sniff_address, speaks_plaintext_http2
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.cluster import missing_components

MODES = ("sync", "aio")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    missing = missing_components("userspace")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, service="userspace", dns=None) as running:
        yield running


def _probe(channel: Any) -> PodProbe:
    probe = channel.observer.probe
    assert isinstance(probe, PodProbe), probe
    return probe


def _first_round(channel: Any) -> PodProbe:
    """The channel's probe, once its first round (started by the first call) has ended."""
    probe = _probe(channel)
    deadline = time.monotonic() + 10
    while probe.rounds < 1 and time.monotonic() < deadline:
        probe.join(0.1)
    assert probe.rounds == 1, probe
    return probe


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_default_options_pin_within_50_calls_and_rebalance_moves(
    cluster: LocalCluster, mode: str
) -> None:
    target = cluster.service_target
    options = ObserveOptions(registry=AffinityRegistry())  # the defaults, a registry aside
    made = channel_factory(target) if mode == "sync" else aio_channel_factory(target)
    rebalance = Rebalance(made)

    async def main() -> None:
        if mode == "sync":
            channel: Any = observe(grpc.insecure_channel(target), options, rebalance=rebalance)
        else:
            channel = aio_observe(
                grpc.aio.insecure_channel(target), options, rebalance=rebalance, target=target
            )
        try:
            pinned_at = None
            for call in range(1, 51):
                if mode == "sync":
                    seen = await asyncio.to_thread(call_sync, channel, "unary_unary")
                else:
                    seen = await call_aio(channel, "unary_unary")
                assert seen.code is grpc.StatusCode.OK
                if call == 1:  # the round it started (a handshake long): waited for, not raced
                    probe = await asyncio.to_thread(_first_round, channel)
                    assert probe.interval_s == AUTO_PROBE_INTERVAL_S
                if channel.detector.state is AffinityState.PINNED:
                    pinned_at = call
                    break
            snapshot = channel.detector.snapshot()
            assert pinned_at is not None, snapshot
            assert snapshot.known_from["probe"] >= 1 and snapshot.probe_connections == 16
            # The alarm moves the calls: Rebalance checks the state every 0.1 s.
            assert await until(lambda: channel.rebalancer.balanced is not None, 5), channel
        finally:
            if mode == "sync":
                channel.close()
            else:
                await channel.close()

    asyncio.run(main())


def test_channels_to_one_target_share_one_probe_schedule(sync_pod: SyncPod) -> None:
    """A channel made per request must not bring a probe round each: one per target."""
    registry = AffinityRegistry()
    channels = [
        observe(grpc.insecure_channel(sync_pod.target), ObserveOptions(registry=registry))
        for _ in range(5)
    ]
    try:
        for channel in channels:
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
        probes = [_probe(channel) for channel in channels]
        for probe in probes:
            probe.join(10)
        assert sum(probe.rounds for probe in probes) == 1, probes
        assert channels[0].detector.snapshot().probe_connections == 16
    finally:
        for channel in channels:
            channel.close()


def test_fresh_connection_channels_and_lanes_make_no_probe(sync_pod: SyncPod) -> None:
    with observe(
        grpc.insecure_channel(sync_pod.target),
        ObserveOptions(registry=AffinityRegistry(), probe=False),
    ) as channel:
        assert channel.observer.probe is None


def test_a_plaintext_grpc_server_is_recognised_without_a_byte_sent(sync_pod: SyncPod) -> None:
    host, port = sniff_address(sync_pod.target) or ("", 0)
    assert (host, port) == ("127.0.0.1", int(sync_pod.target.rpartition(":")[2]))
    assert speaks_plaintext_http2(host, port, 2.0)


def test_a_server_that_waits_for_the_client_is_not_taken_for_plaintext() -> None:
    """A TLS server says nothing until the client's hello: as this silent listener."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert not speaks_plaintext_http2("127.0.0.1", port, 0.3)
        accepted, _ = listener.accept()
        assert accepted.recv(1, socket.MSG_DONTWAIT) == b""  # it was sent nothing
        accepted.close()
    assert not speaks_plaintext_http2("127.0.0.1", port, 0.3)  # nothing listening


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("ipv4:10.0.0.7:80,10.0.0.8:80", ("10.0.0.7", 80)),
        ("ipv6:[fd00::7]:443", ("fd00::7", 443)),
        ("[fd00::7]:443", ("fd00::7", 443)),
        ("unix:/tmp/socket", None),
        ("xds:///svc", None),
    ],
)
def test_the_sniffed_address_is_the_first_connection_s(
    target: str, address: tuple[str, int] | None
) -> None:
    assert sniff_address(target) == address
