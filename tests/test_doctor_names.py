"""``grpc-balance doctor``'s fixes name the target it was given (host and port), never the
package's own ``charge-points``: against a local cluster and a lone server under names of their
own (served by the embedded cluster DNS), in text and in ``--json``, and for every verdict on
hand-made findings."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health, health_pb2_grpc
from leak_fixtures import server_with_own_workers
from test_doctor import _doctor

from grpc_balance_mw.cli.doctor import (
    Connection,
    DoctorOptions,
    Findings,
    TargetNames,
    diagnose,
    judge,
)
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.dns_server import EmbeddedDNS
from grpc_balance_mw.testing.endpoints import Endpoint

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

#: The user's Service, as Kubernetes would name it; the local cluster's DNS name is its headless
#: twin, by the examples' convention.
SERVICE = "meter-readings.grid.svc.cluster.local"
HEADLESS = "meter-readings-headless.grid.svc.cluster.local"
OURS = "charge-points"
QUICK = DoctorOptions(samples=6, checks_per_connection=3, timeout_s=1.0, max_seconds=15)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    from grpc_balance_mw.testing.pytest_plugin import require_components

    require_components(dns="embedded")
    with LocalCluster(
        pods=3, dns="embedded", l7=None, name="meter-readings-headless", namespace="grid"
    ) as running:
        yield running


@pytest.fixture
def named(tmp_path: Path) -> Iterator[Callable[[str, str], str]]:
    """Give ``host:port`` a DNS name: returns ``dns://<server>/<name>:<port>``."""
    servers: list[EmbeddedDNS] = []

    def name(dns_name: str, address: str) -> str:
        host, port = address.rsplit(":", 1)
        server = EmbeddedDNS(tmp_path, name=dns_name)
        servers.append(server)
        server.start([Endpoint("service", host, int(port))])
        return f"dns://{server.address}/{dns_name}:{port}"

    yield name
    for server in servers:
        server.stop()


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_the_clusterip_fix_names_the_service_and_its_headless_twin(
    cluster: LocalCluster, named: Callable[[str, str], str], json_output: bool
) -> None:
    target = named(SERVICE, cluster.service_target)
    port = target.rsplit(":", 1)[1]
    done = _doctor(target, "--samples", "6", "--checks", "3", *(["--json"] if json_output else []))
    assert done.returncode == 1, done.stdout + done.stderr
    if json_output:
        verdict = json.loads(done.stdout)["verdict"]
        assert verdict["code"] == "per-connection"
        fix = verdict["fix"]
    else:
        assert "verdict:    PROBLEM per-connection" in done.stdout
        fix = done.stdout.split("\nfix:\n", 1)[1]
    assert f'balanced_channel("{target}")' in fix
    assert f"{SERVICE}:{port}" in fix
    dns_server = target.split("/")[2]
    assert f'headless_channel("dns://{dns_server}/{HEADLESS}:<targetPort>")' in fix
    assert OURS not in done.stdout


def test_the_headless_fix_dials_the_name_it_was_given(cluster: LocalCluster) -> None:
    verdict = judge(diagnose(cluster.headless_target, QUICK))
    assert verdict.code == "headless-pick-first"
    assert f'headless_channel("{cluster.headless_target}")' in verdict.fix
    assert OURS not in verdict.fix


def test_the_port_gotcha_names_the_headless_name_and_the_wrong_port(
    cluster: LocalCluster,
) -> None:
    service_port = int(cluster.service_target.rsplit(":", 1)[1])
    wrong = f"dns://{cluster.dns_address}/{cluster.fqdn}:{service_port}"
    verdict = judge(diagnose(wrong, QUICK))
    assert verdict.code == "port-unreachable"
    assert f"dns://{cluster.dns_address}/{HEADLESS}:<targetPort>" in verdict.fix
    assert f"Service port {service_port}" in verdict.fix
    assert OURS not in verdict.fix


def test_a_lone_server_without_identity_is_named(named: Callable[[str, str], str]) -> None:
    server = server_with_own_workers(2)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        target = named("billing.payments", f"127.0.0.1:{port}")
        verdict = judge(diagnose(target, QUICK))
    finally:
        server.stop(None).wait(10)
    assert verdict.code == "no-identity"
    assert f"billing.payments:{port}" in verdict.fix and OURS not in verdict.fix


# -- pure: every verdict, and the names derived from a target ------------------------------------


def _findings(
    target: str, *pods: list[str | None], addresses: int = 1, **kwargs: object
) -> Findings:
    findings = Findings(
        target,
        str(kwargs.pop("lb_policy", "pick_first")),
        addresses=[f"10.0.0.{i}" for i in range(addresses)],
        **kwargs,  # type: ignore[arg-type]
    )
    findings.connections = [Connection(list(p)) for p in pods]
    return findings


def _every_verdict(target: str) -> list[Findings]:
    return [
        _findings(target, dns_error="no answer"),
        _findings(target, addresses=3, unreachable=["10.0.0.0", "10.0.0.1", "10.0.0.2"]),
        _findings(target, unreachable=["10.0.0.0"]),
        _unanswered(target),
        _findings(target, [None, None]),
        _findings(target, ["a", "b"], addresses=3, lb_policy="round_robin"),
        _findings(target, ["a", "b"]),
        _findings(target, ["a"], ["a"], addresses=3),
        _findings(target, *[["a"]] * 8, expected_pods=3),
        _findings(target, ["a"]),
        _findings(target, ["a"], ["b"]),
    ]


def _unanswered(target: str) -> Findings:
    findings = _findings(target)
    findings.connections = [Connection(error="UNAVAILABLE: connection refused")]
    return findings


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        (f"dns://10.0.0.53/{SERVICE}:8443", SERVICE, 8443),
        ("meter-readings.grid:9000", "meter-readings.grid", 9000),
        ("10.96.7.7:7070", "10.96.7.7", 7070),
        ("[fd00::7]:7071", "[fd00::7]", 7071),
    ],
)
def test_every_verdict_names_the_target(target: str, host: str, port: int) -> None:
    verdicts = [judge(findings) for findings in _every_verdict(target)]
    assert {v.code for v in verdicts} == {
        "dns-failure",
        "port-unreachable",
        "unreachable",
        "no-identity",
        "headless-round-robin",
        "per-request",
        "headless-pick-first",
        "session-affinity",
        "one-pod-or-client-ip",
        "per-connection",
    }
    for verdict in verdicts:
        assert host.strip("[]") in verdict.fix and str(port) in verdict.fix, verdict
        assert OURS not in verdict.fix, verdict


@pytest.mark.parametrize(
    ("target", "service", "headless"),
    [
        (f"{SERVICE}:80", ("meter-readings", "grid"), HEADLESS),
        (
            "meter-readings.grid.svc:80",
            ("meter-readings", "grid"),
            "meter-readings-headless.grid.svc",
        ),
        ("meter-readings.grid:80", ("meter-readings", "grid"), "meter-readings-headless.grid"),
        ("meter-readings:80", ("meter-readings", None), "meter-readings-headless"),
        (f"{HEADLESS}:80", ("meter-readings-headless", "grid"), HEADLESS),
        ("10.96.7.7:80", None, "<name>-headless.<namespace>.svc.cluster.local"),
        ("api.example.com:443", None, "<name>-headless.<namespace>.svc.cluster.local"),
        ("localhost:80", None, "<name>-headless.<namespace>.svc.cluster.local"),
    ],
)
def test_the_service_and_headless_names_derived_from_a_target(
    target: str, service: tuple[str, str | None] | None, headless: str
) -> None:
    names = TargetNames.of(target)
    assert (names.service, names.headless) == (service, headless)


def test_the_session_affinity_fix_patches_the_named_service() -> None:
    verdict = judge(_findings(f"{SERVICE}:80", *[["a"]] * 8, expected_pods=3))
    assert "kubectl patch service meter-readings -n grid -p" in verdict.fix
