"""Headless targets: parsing ``dns:`` targets, and the probe counting pods from the DNS answer."""

from __future__ import annotations

import socket

import pytest
from conftest import require

from grpc_balance_mw.affinity import AffinityDetector
from grpc_balance_mw.headless import DnsTarget, parse_dns_target, resolve_addresses
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.testing import LocalCluster, missing_components


@pytest.mark.parametrize(
    ("target", "parsed"),
    [
        ("dns:///cp.ev.svc:50051", DnsTarget(None, "cp.ev.svc", 50051)),
        ("dns:cp.ev.svc", DnsTarget(None, "cp.ev.svc", 443)),
        ("dns://127.0.0.53:5353/cp.ev.svc:80", DnsTarget("127.0.0.53:5353", "cp.ev.svc", 80)),
        ("dns://10.96.0.10/cp:80", DnsTarget("10.96.0.10:53", "cp", 80)),
        ("dns:///[fd00::1]:8080", DnsTarget(None, "fd00::1", 8080)),
        ("127.0.0.1:50051", None),
        ("ipv4:127.0.0.1:1,127.0.0.2:1", None),
        ("dns:///:80", None),
        ("dns:///cp:port", None),
    ],
)
def test_parse_dns_target(target: str, parsed: DnsTarget | None) -> None:
    assert parse_dns_target(target) == parsed


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_no_answer_is_not_an_empty_answer() -> None:
    silent = DnsTarget(f"127.0.0.1:{_free_udp_port()}", "cp.ev.svc", 80)  # nothing listens
    assert resolve_addresses(silent, timeout_s=0.2) is None
    assert "127.0.0.1" in (resolve_addresses(DnsTarget(None, "localhost", 80)) or [])


@pytest.mark.slow
def test_the_probe_counts_pods_from_the_headless_answer() -> None:
    missing = missing_components("userspace", "embedded")
    require(not missing, "; ".join(missing))
    with LocalCluster(pods=3, dns="embedded") as cluster:
        target = cluster.headless_target
        detector = AffinityDetector(target)
        probe = PodProbe(target, detector, interval_s=0.01)
        probe.maybe_probe(now=1.0)
        probe.join(10)
        assert detector.snapshot().dns_pods == 3
        cluster.kill(cluster.pods[0].name)  # out of DNS when kill() returns
        probe.maybe_probe(now=2.0)
        probe.join(10)
        snapshot = detector.snapshot()
        assert snapshot.dns_pods == 2 and snapshot.known_count >= 2
        assert set(snapshot.known_pods) <= {pod.name for pod in cluster.pods}
