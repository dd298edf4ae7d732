"""Security of the remedy: TLS through the balanced channel with certificates made here (a CA, a
server certificate, a client certificate), the server name checked, mutual TLS, never a
downgrade on a redial; the opaque identity mode leaks no pod name or IP through the remedy's own
health checks (lanes, scouts, predial, doctor); no secret or metadata value reaches the logs.

(The dial-per-request fallback's TLS and mTLS are in tests/test_redial.py.)
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import require
from fault_load import MODES, OK, close_channel, covered, load, open_channel, retry_policy, until
from redial_fixtures import Certificates, PeerPod, make_certificates

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.cli.doctor import DoctorOptions, diagnose, judge, render
from grpc_balance_mw.identity import OPAQUE_KEY_ENV
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import PoolConfig, rotate_after_calls
from grpc_balance_mw.testing import LocalCluster

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
OPAQUE_KEY = "k3y-0f-the-0paque-m0de-Zq81xW"  # >= 16 bytes
SECRET = "Bearer s3cr3t-t0ken-9f8e7d"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    require(shutil.which("openssl") is not None, "openssl is not installed")
    return make_certificates(tmp_path_factory.mktemp("pki"))


def tls_pod(certificates: Certificates, mutual: bool) -> PeerPod:
    return PeerPod(
        grpc.ssl_server_credentials(
            [(certificates.key, certificates.chain)],
            root_certificates=certificates.ca if mutual else None,
            require_client_auth=mutual,
        )
    )


def client_credentials(certificates: Certificates, with_certificate: bool) -> Any:
    if not with_certificate:
        return grpc.ssl_channel_credentials(certificates.ca)
    return grpc.ssl_channel_credentials(
        certificates.ca, certificates.client_key, certificates.client_chain
    )


async def calls_through(
    mode: str, target: str, count: int, kind: str = "unary_unary", **kwargs: Any
) -> tuple[list[Any], Any]:
    """``count`` calls of ``kind`` through a fresh balanced channel; (outcomes, the channel)."""
    channel = open_channel(
        mode, "balanced", target,
        observe=ObserveOptions(registry=AffinityRegistry()),
        rotation=rotate_after_calls(5),
        pool_config=PoolConfig(min_lanes=2, scout_interval_s=0.05),
        **kwargs,
    )  # fmt: skip
    try:
        return await load(mode, channel, kind, count, 4, timeout=5), channel
    finally:
        await close_channel(mode, channel)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
@pytest.mark.parametrize("mode", MODES)
def test_tls_through_the_balanced_channel(
    certificates: Certificates, mode: str, mutual: bool
) -> None:
    pod = tls_pod(certificates, mutual)
    try:
        good = client_credentials(certificates, with_certificate=mutual)
        outcomes, channel = asyncio.run(calls_through(mode, pod.target, 120, credentials=good))
        assert [o.code for o in outcomes] == [OK] * 120
        # Lanes rotated and scouts dialled (every dial a TLS handshake and a health check).
        assert channel.pool.rotations >= 2 and channel.pool.dials >= 6, channel
        attempts = pod.servicer.attempts
        assert len(attempts) == 120
        assert {tuple(a.security) for a in attempts} == {(b"ssl",)}  # every lane, every redial
        assert len(pod.peers()) >= 3  # on several connections

        # The server's name is checked: a certificate for another name is refused.
        wrong = [("grpc.ssl_target_name_override", "not-this-server.example")]
        outcomes, channel = asyncio.run(
            calls_through(mode, pod.target, 8, credentials=good, options=wrong)
        )
        assert {o.code for o in outcomes} == {UNAVAILABLE}
        assert not [lane for lane in channel.pool.lanes if lane.pod]
        if mutual:  # a client without its certificate is refused, not downgraded
            bare = client_credentials(certificates, with_certificate=False)
            outcomes, _ = asyncio.run(calls_through(mode, pod.target, 8, credentials=bare))
            assert {o.code for o in outcomes} == {UNAVAILABLE}
        assert len(pod.servicer.attempts) == 120  # no refused call reached the service
    finally:
        pod.stop()


def test_a_retryable_call_fails_unavailable_not_no_lane_when_no_dial_can_succeed(
    certificates: Certificates,
) -> None:
    """Every dial failing (here: the TLS name) leaves no lane at all for a while: the call gets
    UNAVAILABLE as from a grpc channel without a connection, and retries see it as such."""
    pod = tls_pod(certificates, mutual=False)
    policy = retry_policy(True, attempts=4, backoff_s=0.2)
    try:
        wrong = [("grpc.ssl_target_name_override", "not-this-server.example")]
        good = client_credentials(certificates, with_certificate=False)
        for mode in MODES:
            for kind in ("unary_unary", "unary_stream"):
                outcomes, _ = asyncio.run(
                    calls_through(
                        mode, pod.target, 12, kind, credentials=good, options=wrong, retry=policy
                    )
                )
                assert {o.code for o in outcomes} == {UNAVAILABLE}, (mode, kind)
        assert policy.budget is not None and policy.budget.counts()[1] > 0
    finally:
        pod.stop()


# -- the opaque identity mode, and what reaches the logs ---------------------------------------


@pytest.fixture(scope="module")
def opaque_cluster() -> Iterator[LocalCluster]:
    """Pods that stamp a keyed hash (the key from the environment, as in a Deployment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OPAQUE_KEY_ENV, OPAQUE_KEY)
        cluster = LocalCluster(pods=3, service="userspace", dns=None).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def secrets_of(cluster: LocalCluster) -> list[str]:
    """What must never show: pod names and IPs, the key, a metadata value."""
    pods = [pod.name for pod in cluster.pods] + [
        pod.address.rsplit(":", 1)[0] for pod in cluster.pods
    ]
    return [*pods, OPAQUE_KEY, SECRET, SECRET.split()[1]]


@pytest.mark.slow
def test_opaque_pods_and_metadata_leak_nothing_through_the_remedy_or_the_logs(
    opaque_cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = opaque_cluster
    seen: list[str] = []
    lane_pods: set[str] = set()
    metadata = (("authorization", SECRET), ("x-tenant", SECRET.split()[1]))

    async def run(mode: str) -> None:
        for remedy in ("balanced", "dial-per-request"):
            kwargs: dict[str, Any] = (
                {
                    "pool_config": PoolConfig(
                        expected_pods=3, scout_interval_s=0.05, health_interval_s=0.1
                    )
                }
                if remedy == "balanced"
                else {"predial": 2}
            )
            channel = open_channel(
                mode, remedy, cluster.service_target, retry=retry_policy(True),
                observe=ObserveOptions(expected_pods=3, registry=AffinityRegistry()),
                **kwargs,
            )  # fmt: skip
            try:
                if remedy == "balanced":
                    assert await until(partial(_covers_three, channel)), channel
                    await asyncio.sleep(0.3)  # scouts and health checks come and go
                    # Active lanes only: a scout still being checked has no pod yet.
                    lanes = [lane for lane in channel.pool.lanes if lane.is_available()]
                    lane_pods.update(str(lane.pod) for lane in lanes)
                outcomes = await _metadata_calls(mode, channel, metadata)
                assert {o for o in outcomes} == {OK}
                seen.append(repr(channel))
            finally:
                await close_channel(mode, channel)

    with caplog.at_level(logging.DEBUG, logger="grpc_balance_mw"), caplog.at_level(logging.INFO):
        for mode in MODES:
            asyncio.run(run(mode))
        findings = diagnose(
            cluster.service_target, DoctorOptions(samples=4, checks_per_connection=2)
        )
        seen.append(render(findings, judge(findings)))
        seen.extend(str(pod) for connection in findings.connections for pod in connection.pods)
        cluster.kill(cluster.pods[0].name)  # warnings and errors are logged too
    seen.append(caplog.text)
    logs = "\n".join(
        path.read_text(errors="replace") for path in Path(cluster.workdir or ".").glob("*")
    )
    for secret in secrets_of(cluster):
        assert not [text for text in seen if secret in text], secret
        assert secret not in logs, secret  # nor in what the pods and the Service logged
    # The lanes and the doctor did tell the pods apart, by their opaque ids.
    doctor_pods = {pod for connection in findings.connections for pod in connection.pods}
    assert len(lane_pods) >= 3 and all(pod.startswith("pod-") for pod in lane_pods), lane_pods
    assert doctor_pods and all(str(pod).startswith("pod-") for pod in doctor_pods), doctor_pods
    seen.extend(lane_pods)


def _covers_three(channel: Any) -> bool:
    return len(covered(channel)) == 3


async def _metadata_calls(mode: str, channel: Any, metadata: Any) -> list[grpc.StatusCode]:
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

    stub = pb_grpc.ChargePointsStub(channel)
    request = pb.GetChargePointRequest(id="cp-1")
    if mode == "sync":

        def calls() -> list[grpc.StatusCode]:
            for _ in range(12):
                stub.GetChargePoint(request, timeout=5, metadata=metadata)
            return [OK]

        return await asyncio.to_thread(calls)
    for _ in range(12):
        await stub.GetChargePoint(request, timeout=5, metadata=metadata)
    return [OK]
