"""``grpc-balance doctor``: the right verdict for each way a cluster can be set up, against the
local cluster (plain ClusterIP, headless with pick_first and with round_robin, the wrong port,
sessionAffinity ClientIP, HAProxy and nginx L7 proxies, a server without the identity stamp, a
dead DNS server), and the pure judging on hand-made findings."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from grpc_health.v1 import health, health_pb2_grpc
from leak_fixtures import server_with_own_workers

from grpc_balance_mw.cli import main as cli_main
from grpc_balance_mw.cli.doctor import Connection, DoctorOptions, Findings, diagnose, judge
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.testing import LocalCluster

Factory = Callable[..., LocalCluster]
QUICK = DoctorOptions(samples=8, checks_per_connection=4, timeout_s=1.0, max_seconds=15)


def _verdict(target: str, **changes: object) -> str:
    options = DoctorOptions(**{**QUICK.__dict__, **changes})  # type: ignore[arg-type]
    return judge(diagnose(target, options)).code


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One cluster with every part the doctor looks at from the host (module scope: cheap)."""
    from grpc_balance_mw.testing.pytest_plugin import require_components

    require_components(service="haproxy", dns="embedded", l7="haproxy")
    with LocalCluster(pods=3, service="haproxy", dns="embedded", l7="haproxy") as running:
        yield running


@pytest.mark.cluster
def test_a_clusterip_service_balances_per_connection(cluster: LocalCluster) -> None:
    findings = diagnose(cluster.service_target, QUICK)
    assert judge(findings).code == "per-connection" and judge(findings).problem
    assert len(findings.addresses or ()) == 1
    assert not any(connection.switched for connection in findings.answered)


@pytest.mark.cluster
def test_a_headless_name_under_pick_first_is_a_problem(cluster: LocalCluster) -> None:
    assert _verdict(cluster.headless_target) == "headless-pick-first"


@pytest.mark.cluster
def test_a_headless_name_under_round_robin_is_fine(cluster: LocalCluster) -> None:
    findings = diagnose(cluster.headless_target, DoctorOptions(lb_policy="round_robin"))
    verdict = judge(findings)
    assert (verdict.code, verdict.problem) == ("headless-round-robin", False)
    assert len(findings.pods) == 3


@pytest.mark.cluster
def test_the_service_port_on_the_headless_name_is_the_port_gotcha(cluster: LocalCluster) -> None:
    service_port = cluster.service_target.rsplit(":", 1)[1]
    wrong = f"dns://{cluster.dns_address}/{cluster.fqdn}:{service_port}"
    verdict = judge(diagnose(wrong, QUICK))
    assert verdict.code == "port-unreachable" and "targetPort" in verdict.fix


@pytest.mark.parametrize("proxy", ["haproxy", "nginx"])
@pytest.mark.cluster
def test_an_l7_proxy_balances_per_request(
    cluster: LocalCluster, local_cluster_factory: Factory, proxy: str
) -> None:
    target = (
        cluster.l7_target
        if proxy == "haproxy"
        else local_cluster_factory(pods=3, dns=None, l7="nginx").l7_target
    )
    verdict = judge(diagnose(target, QUICK))
    assert (verdict.code, verdict.problem) == ("per-request", False)


@pytest.mark.slow
def test_a_dead_dns_server_is_a_clear_verdict(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(pods=1, dns="embedded")
    target = cluster.headless_target
    cluster._frontend(cluster._dns, "dns").stop()
    findings = diagnose(target, DoctorOptions(timeout_s=0.3))
    verdict = judge(findings)
    assert verdict.code == "dns-failure" and "no answer" in verdict.summary
    assert findings.connections == []  # nothing to dial


@pytest.mark.local_cluster(pods=3, service="iptables", session_affinity="ClientIP")
@pytest.mark.cluster
def test_client_ip_session_affinity_is_named(local_cluster: LocalCluster) -> None:
    target = local_cluster.service_target
    verdict = judge(diagnose(target, DoctorOptions(**{**QUICK.__dict__, "expected_pods": 3})))
    assert verdict.code == "session-affinity" and "sessionAffinity: None" in verdict.fix
    # Without knowing that more pods exist, one pod is all it can honestly say.
    assert _verdict(target) == "one-pod-or-client-ip"


def test_a_server_that_stamps_no_identity_is_told_how_to() -> None:
    server = server_with_own_workers(2)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        verdict = judge(diagnose(f"127.0.0.1:{port}", QUICK))
    finally:
        server.stop(None)
    assert verdict.code == "no-identity" and "PodIdentityInterceptor" in verdict.fix


def test_nothing_listening_is_unreachable_in_bounded_time() -> None:
    verdict = judge(diagnose("127.0.0.1:1", DoctorOptions(timeout_s=0.2, max_seconds=2)))
    assert verdict.code == "port-unreachable"


@pytest.mark.parametrize("target", ["ipv4:127.0.0.1:1,127.0.0.2:1", "unix:/tmp/x", "dns:///:80"])
def test_a_target_the_doctor_cannot_read_is_a_configuration_error(target: str) -> None:
    with pytest.raises(ConfigurationError):
        diagnose(target, QUICK)


def _findings(*connections: list[str | None], addresses: int = 1, **kwargs: object) -> Findings:
    findings = Findings(
        "t:1",
        str(kwargs.pop("lb_policy", "pick_first")),
        addresses=[f"10.0.0.{i}" for i in range(addresses)],
        **kwargs,  # type: ignore[arg-type]
    )
    findings.connections = [Connection(list(pods)) for pods in connections]
    return findings


def test_judging_needs_enough_connections_to_blame_session_affinity() -> None:
    # 3 fresh connections on one of 3 pods happen by chance (1 in 9): not evidence enough.
    assert judge(_findings(["a"], ["a"], ["a"], expected_pods=3)).code == "one-pod-or-client-ip"
    assert judge(_findings(*[["a"]] * 8, expected_pods=3)).code == "session-affinity"


def test_judging_a_pod_change_on_one_connection_is_per_request() -> None:
    assert judge(_findings(["a", "b"], ["a"])).code == "per-request"
    assert judge(_findings(["a", "b"], addresses=3, lb_policy="round_robin")).problem is False
    assert judge(_findings(["a"], ["b"], ["c"])).code == "per-connection"
    assert judge(_findings([None, None])).code == "no-identity"


# -- the command line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["doctor"],
        ["doctor", "h:1", "--samples", "0"],
        ["doctor", "h:1", "--timeout", "-1"],
        ["doctor", "h:1", "--max-seconds", "nan"],
        ["doctor", "h:1", "--lb-policy", "least_request"],
        ["doctor", "h:1", "--expected-pods", "0"],
    ],
    ids=" ".join,
)
def test_a_bad_doctor_argument_is_a_usage_error(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(args)
    assert exited.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpc_balance_mw.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.cluster
def test_the_command_prints_json_and_exits_1_on_a_problem(cluster: LocalCluster) -> None:
    done = _doctor(cluster.service_target, "--json", "--samples", "6")
    assert done.returncode == 1, done.stderr
    document = json.loads(done.stdout)
    assert document["verdict"]["code"] == "per-connection"
    assert len(document["connections"]) == 6 and len(document["pods"]) >= 2
    assert "doctor: fresh connection" in done.stderr  # progress goes to stderr


@pytest.mark.cluster
def test_the_command_exits_0_when_nothing_is_wrong(cluster: LocalCluster) -> None:
    done = _doctor(cluster.headless_target, "--lb-policy", "round_robin", "--samples", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict:    OK headless-round-robin" in done.stdout


@pytest.mark.slow
def test_an_unreadable_target_is_one_clear_line() -> None:
    done = _doctor("unix:/tmp/nothing.sock")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "grpc-balance: error: cannot read the target 'unix:/tmp/nothing.sock': use host:port "
        "or dns:[//dns-server/]host:port"
    ]
