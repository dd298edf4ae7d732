"""LocalCluster running the user's own service: a servicer in each pod, or a command as each pod.

The service is the tests' own Greeter (tests/greeter_service.py, generic handlers), not the
harness's charge-points: the spread is read from the pods' own counts (servicer) or from the
identity each response carries (command, whose pods the harness cannot count).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from foreign_pods import wait_for_lanes
from greeter_service import METHOD, register, say_hello
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import pod_from_metadata
from grpc_balance_mw.testing import ClusterError, LocalCluster, live_children

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

Factory = Callable[..., LocalCluster]
FRESH = [("grpc.use_local_subchannel_pool", 1)]
CALLS = 300
GREETER = str(Path(__file__).with_name("greeter_service.py"))


def max_share_over_fair(counts: Counter[str] | dict[str, int], pods: int) -> float:
    total = sum(counts.values())
    return max(counts.values()) / (total / pods)


def serving_pod(call: grpc.Call) -> str:
    identity = pod_from_metadata(call.initial_metadata())
    assert identity is not None, "the response carries no pod identity"
    return identity.name


def greet(channel: grpc.Channel, calls: int) -> Counter[str]:
    """``calls`` SayHellos, by the pod each response names; each reply names the same pod."""
    seen: Counter[str] = Counter()
    for _ in range(calls):
        reply, call = say_hello(channel)
        pod = serving_pod(call)
        assert reply.endswith(b" from " + pod.encode())
        seen[pod] += 1
    return seen


# -- the user's servicer, run by the harness in each pod ------------------------------------


@pytest.mark.parametrize("servicer", [register, "greeter_service:register"], ids=["fn", "ref"])
def test_a_servicer_of_its_own_spreads_through_the_balanced_channel(
    local_cluster_factory: Factory, servicer: object
) -> None:
    cluster = local_cluster_factory(pods=3, servicer=servicer, name="greeter")
    assert [pod.name for pod in cluster.pods] == ["greeter-0", "greeter-1", "greeter-2"]
    with balanced_channel(cluster.service_target) as channel:
        wait_for_lanes(channel)
        cluster.reset_counts()
        seen = greet(channel, CALLS)
    served = cluster.served()  # the pods' own counts: health and admin calls are not in them
    assert served == dict(seen), (served, seen)
    assert sum(served.values()) == CALLS
    assert {name: stats.calls[METHOD] for name, stats in cluster.stats().items()} == served
    assert max_share_over_fair(served, 3) < 1.3, served


def test_a_plain_channel_to_the_service_is_pinned_to_one_pod(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(pods=3, servicer=register, name="greeter")
    with grpc.insecure_channel(cluster.service_target, options=FRESH) as channel:
        seen = greet(channel, 100)
    served = cluster.served()
    assert sorted(served.values()) == [0, 0, 100], served
    assert served == {**dict.fromkeys(served, 0), **seen}


def test_the_harness_serves_health_and_flips_it_for_the_users_servicer(
    local_cluster_factory: Factory,
) -> None:
    cluster = local_cluster_factory(pods=2, servicer=register, name="greeter")
    pod = cluster.pods[0]
    request = health_pb2.HealthCheckRequest(service="")
    with grpc.insecure_channel(pod.address, options=FRESH) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply, call = health.Check.with_call(request, timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert serving_pod(call) == pod.name
        cluster.set_serving(pod.name, False)
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert [endpoint.name for endpoint in cluster.endpoints()] == [cluster.pods[1].name]
    with pytest.raises(ClusterError, match="service time and capacity are its own"):
        cluster.configure(pod.name, service_time_ms=5)


# -- the user's command as each pod ---------------------------------------------------------


def test_a_pod_command_spreads_by_the_identity_it_stamps(local_cluster_factory: Factory) -> None:
    cluster = local_cluster_factory(
        pods=3, pod_command=[sys.executable, GREETER], name="greeter", pod_ready_timeout_s=20
    )
    ports = {pod.port for pod in cluster.pods}
    assert len(ports) == 1 and ports != {0}
    with balanced_channel(cluster.service_target) as channel:
        wait_for_lanes(channel)
        seen = greet(channel, CALLS)
    assert set(seen) == {pod.name for pod in cluster.pods}
    assert max_share_over_fair(seen, 3) < 1.3, seen
    with grpc.insecure_channel(cluster.service_target, options=FRESH) as channel:
        assert len(greet(channel, 50)) == 1
    with pytest.raises(ClusterError, match="x-balance-pod"):
        cluster.served()


@pytest.mark.parametrize(
    ("code", "timeout_s", "failure"),
    [
        ("import sys; sys.exit('no config for {name}')", 20, r"exited before(?s:.*)no config for"),
        ("import time; time.sleep(60)", 1.0, r"did not accept connections .* in 1\.0s"),
    ],
    ids=["exits", "never-listens"],
)
def test_a_pod_command_that_does_not_serve_fails_the_start_within_its_timeout(
    local_cluster_factory: Factory, code: str, timeout_s: float, failure: str
) -> None:
    with pytest.raises(ClusterError, match=failure):
        local_cluster_factory(
            pods=1, pod_command=[sys.executable, "-c", code], pod_ready_timeout_s=timeout_s
        )
    assert live_children() == []  # the pod that failed is reaped too


# -- what is refused before anything starts ------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"servicer": lambda server, pod: None}, "cannot be imported in a pod process"),
        ({"servicer": "greeter_service:nothing_here"}, "does not import"),
        ({"servicer": "no_such_module_here:register"}, "does not import"),
        ({"servicer": "greeter_service"}, "module:function"),
        ({"servicer": register, "pod_command": ["x"]}, "not both"),
        ({"servicer": register, "service_time_ms": 5.0}, "the user's service has its own"),
        ({"pod_command": "python server.py"}, "list of arguments"),
        ({"pod_command": ["x"], "max_connection_age_s": 5.0}, "sets its own"),
        ({"pod_command": ["x"], "pod_ready_timeout_s": 0}, "pod_ready_timeout_s"),
    ],
)
def test_a_user_service_the_pods_cannot_run_is_refused(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        LocalCluster(pods=1, **kwargs)  # type: ignore[arg-type]
