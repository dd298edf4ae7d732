"""The headless channel builder, sync and aio, against the local cluster's headless DNS: an even
spread, client-side health checking, the one-address and wrong-port warnings, a dead DNS."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import grpc
import pytest
from calls import call_aio, call_sync

from grpc_balance_mw.aio.headless_channel import headless_channel as aio_headless_channel
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.headless import (
    check_headless,
    check_in_background,
    headless_options,
    normalize_target,
)
from grpc_balance_mw.headless_channel import headless_channel
from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.testing import LocalCluster

Factory = Callable[..., LocalCluster]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("cp.ev.svc:50051", "dns:///cp.ev.svc:50051"),
        ("dns:///cp.ev.svc:50051", "dns:///cp.ev.svc:50051"),
        ("dns://10.96.0.10:53/cp:80", "dns://10.96.0.10:53/cp:80"),
    ],
)
def test_the_dns_scheme_is_made_explicit(given: str, expected: str) -> None:
    assert normalize_target(given) == expected


@pytest.mark.parametrize("target", ["ipv4:10.0.0.1:80,10.0.0.2:80", "unix:/tmp/x.sock", "dns:///"])
def test_a_target_that_does_not_resolve_through_dns_is_refused(target: str) -> None:
    with pytest.raises(ConfigurationError):
        normalize_target(target)


def test_the_options_carry_round_robin_health_checks_and_the_interval() -> None:
    options = dict(
        headless_options(
            [("grpc.lb_policy_name", "pick_first"), ("grpc.max_send_message_length", 1)],
            health_service="chargepoints.v1.ChargePoints",
            min_resolution_interval_s=5,
        )
    )
    assert "grpc.lb_policy_name" not in options
    assert options["grpc.max_send_message_length"] == 1
    assert options["grpc.dns_min_time_between_resolutions_ms"] == 5000
    assert json.loads(options["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "chargepoints.v1.ChargePoints"},
    }
    with pytest.raises(ConfigurationError):
        headless_options(None, health_service="", min_resolution_interval_s=0)


def _served_by(seen_pods: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for pod in seen_pods:
        counts[pod] = counts.get(pod, 0) + 1
    return counts


def _sync_calls(channel: grpc.Channel, count: int) -> list[str]:
    return [str(call_sync(channel, "unary_unary").initial.get(POD_HEADER)) for _ in range(count)]


async def _aio_calls(channel: grpc.aio.Channel, count: int) -> list[str]:
    return [
        str((await call_aio(channel, "unary_unary")).initial.get(POD_HEADER)) for _ in range(count)
    ]


def _until_all_pods(calls: Callable[[], list[str]], pods: int) -> None:
    """round_robin sends the first calls to whichever subchannel connected first."""
    deadline = time.monotonic() + 10
    while len(set(calls())) < pods:
        assert time.monotonic() < deadline, "round_robin never reached every pod"


@pytest.mark.parametrize("mode", ["sync", "aio"])
@pytest.mark.slow
async def test_the_builder_spreads_calls_evenly(local_cluster_factory: Factory, mode: str) -> None:
    cluster = local_cluster_factory(pods=3, dns="embedded")
    if mode == "sync":
        with headless_channel(cluster.headless_target) as channel:
            _until_all_pods(lambda: _sync_calls(channel, 3), 3)
            cluster.reset_counts()
            seen = _sync_calls(channel, 90)
    else:
        async with aio_headless_channel(cluster.headless_target) as aio_channel:
            for _ in range(200):
                if len(set(await _aio_calls(aio_channel, 3))) == 3:
                    break
            cluster.reset_counts()
            seen = await _aio_calls(aio_channel, 90)
    assert _served_by(seen) == {pod.name: 30 for pod in cluster.pods}
    assert cluster.served() == {pod.name: 30 for pod in cluster.pods}


@pytest.mark.slow
def test_a_not_serving_pod_gets_no_calls_while_dns_still_lists_it(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(pods=3, dns="embedded")
    with headless_channel(cluster.headless_target) as channel:
        _until_all_pods(lambda: _sync_calls(channel, 3), 3)
        leaving = cluster.pods[0]
        leaving.set_serving(False)  # the pod's own health only: DNS still answers its address
        assert check_headless(cluster.headless_target).addresses is not None
        assert len(check_headless(cluster.headless_target).addresses or ()) == 3
        deadline = time.monotonic() + 10
        while leaving.name in _sync_calls(channel, 6):  # the health Watch reaches the client
            assert time.monotonic() < deadline, "the NOT_SERVING pod kept getting calls"
        assert leaving.name not in _sync_calls(channel, 60)


@pytest.mark.slow
def test_a_clusterip_name_is_flagged_once(
    local_cluster_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = local_cluster_factory(pods=3, dns=None)
    target = f"dns:///{cluster.service_target}"  # one address: the Service's VIP
    problems = check_headless(target).problems
    assert len(problems) == 1 and "one address" in problems[0]
    with caplog.at_level(logging.WARNING, logger="grpc_balance_mw"):
        first = check_in_background(target)
        assert first is not None
        first.join(10)
        assert check_in_background(target) is None  # once per target and process
    assert [r.message for r in caplog.records].count(f"headless channel to {target}: {problems[0]}")


@pytest.mark.slow
def test_the_service_port_on_a_headless_name_is_the_port_gotcha(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(pods=2, dns="embedded")
    service_port = int(cluster.service_target.rsplit(":", 1)[1])
    wrong = f"dns://{cluster.dns_address}/{cluster.fqdn}:{service_port}"
    check = check_headless(wrong, timeout_s=0.5)
    assert check.addresses is not None and len(check.addresses) == 2
    assert set(check.unreachable) == set(check.addresses)
    assert any("targetPort" in problem for problem in check.problems)
    assert check_headless(cluster.headless_target).problems == ()


@pytest.mark.slow
def test_a_dead_dns_server_is_a_clear_problem_not_an_error(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(pods=1, dns="embedded")
    target = cluster.headless_target
    cluster._frontend(cluster._dns, "dns").stop()  # the cluster DNS goes down
    check = check_headless(target, timeout_s=0.3)
    assert check.addresses is None
    assert check.problems and "no answer" in check.problems[0]


async def test_aio_builder_fails_calls_cleanly_when_nothing_resolves() -> None:
    async with aio_headless_channel("dns:///no-such-service.invalid:50051", check=False) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(ch.unary_unary("/x.Y/Z")(b"", timeout=2), 5)
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
