"""The pod probe: a new connection, a health check, the identity read, closed; never raising."""

from __future__ import annotations

import socket

import pytest
from affinity_fixtures import HeaderPod
from conftest import IDENTITY, SyncPod

from grpc_balance_mw.affinity import AffinityDetector
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.probe import PodProbe


def test_probe_reads_the_pod_from_the_health_check(sync_pod: SyncPod) -> None:
    detector = AffinityDetector(sync_pod.target)
    probe = PodProbe(sync_pod.target, detector, connections=2)
    assert probe.probe_once() == [IDENTITY.name, IDENTITY.name]
    probe.maybe_probe(now=0.0)
    probe.join(10)
    assert probe.rounds == 1 and detector.snapshot().known_pods == (IDENTITY.name,)


def test_probe_is_rate_limited(sync_pod: SyncPod) -> None:
    probe = PodProbe(sync_pod.target, AffinityDetector(sync_pod.target), interval_s=30)
    probe.maybe_probe(now=100.0)
    probe.join(10)
    probe.maybe_probe(now=129.0)
    probe.join(10)
    assert probe.rounds == 1
    probe.maybe_probe(now=130.0)
    probe.join(10)
    assert probe.rounds == 2


def test_probe_of_a_server_without_identity_or_health_learns_nothing() -> None:
    plain = HeaderPod()  # no identity middleware and no health service: UNIMPLEMENTED
    try:
        probe = PodProbe(plain.target, AffinityDetector(plain.target))
        assert probe.probe_once() == []
        # The default follows the pods known: none yet, so 5.
        assert probe.failures == probe.connections_per_round() == 5
    finally:
        plain.stop()


def test_probe_of_nothing_listening_does_not_raise() -> None:
    with socket.socket() as placeholder:  # a port that was free a moment ago
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    target = f"127.0.0.1:{port}"
    detector = AffinityDetector(target)
    probe = PodProbe(target, detector, timeout_s=0.5)
    probe.maybe_probe(now=0.0)
    probe.join(10)
    assert probe.rounds == 1 and probe.failures == probe.connections_per_round()
    assert detector.snapshot().known_pods == ()


def test_a_round_dials_more_connections_the_more_pods_are_known() -> None:
    """5 per pod known plus 5, from 3 to ``max_connections``: enough that a pod added to a
    3-pod ClusterIP Service is reached by the first round after (99.7 %); explicit counts stay."""
    detector = AffinityDetector("10.96.0.10:80")
    probe = PodProbe("10.96.0.10:80", detector)
    assert probe.connections_per_round() == 5
    detector.expected_pods = 3
    assert probe.connections_per_round() == 20
    detector.expected_pods = 300
    assert probe.connections_per_round() == 24
    assert PodProbe("10.96.0.10:80", detector, connections=2).connections_per_round() == 2
    with pytest.raises(ConfigurationError):
        PodProbe("10.96.0.10:80", detector, max_connections=2)
