"""The dial-per-request channel, sync and aio, against real servers: a new connection per call,
retries only where marked, the deadline across attempts, the retry budget, predial, TLS, close."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from calls import CALL_KINDS
from conftest import require
from redial_fixtures import (
    GET,
    UNAVAILABLE,
    UPLOAD,
    WATCH,
    Driver,
    PeerPod,
    fds_left,
    get_request,
    make_certificates,
    open_fds,
    wait_until,
)

from grpc_balance_mw.affinity.registry import AffinityRegistry
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.retry import RetryBudget, RetryPolicy, wait_full_jitter
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
FAST = wait_full_jitter(0.001, 2.0, 0.005)


@pytest.fixture
def pod() -> Iterator[PeerPod]:
    made = PeerPod()
    yield made
    made.stop()


def policy(**kwargs: Any) -> RetryPolicy:
    kwargs.setdefault("methods", {GET})
    kwargs.setdefault("backoff", FAST)
    return RetryPolicy(**kwargs)


@pytest.mark.parametrize("kind", CALL_KINDS)
def test_every_call_is_on_a_new_connection_closed_after_it(
    driver: Driver, pod: PeerPod, kind: str
) -> None:
    registry = AffinityRegistry()
    channel = driver.channel(pod.target, observe=ObserveOptions(registry=registry))
    seen = [driver.call(channel, kind) for _ in range(3)]
    assert [s.code for s in seen] == [OK] * 3
    method = next(a.method for a in pod.servicer.attempts)
    assert len(pod.servicer.of(method)) == 3
    assert len(pod.peers(method)) == 3  # three TCP connections, not one shared subchannel
    assert wait_until(lambda: driver.stats(channel)[2] == 3, driver)  # each closed
    assert driver.stats(channel)[0] == 3
    driver.close(channel)
    # every call was observed: the pod it reached is known to the target's detector
    assert registry.detector(pod.target).snapshot().known_pods == ("redial-pod",)


def test_a_retryable_method_is_retried_on_new_connections(driver: Driver, pod: PeerPod) -> None:
    pod.servicer.unavailable = 2
    channel = driver.channel(pod.target, retry=policy(max_attempts=3))
    assert driver.call(channel).code is OK
    assert len(pod.servicer.of(GET)) == 3
    assert len(pod.peers()) == 3
    driver.close(channel)


def test_a_method_not_marked_fails_with_its_status_sent_once(driver: Driver, pod: PeerPod) -> None:
    pod.servicer.unavailable = 1
    channel = driver.channel(pod.target, retry=policy(methods={UPLOAD}, max_attempts=5))
    seen = driver.call(channel)
    assert seen.code is UNAVAILABLE
    assert seen.trailing.get("x-balance-pod") == "redial-pod"  # the failed attempt's own status
    assert len(pod.servicer.of(GET)) == 1
    driver.close(channel)


def test_request_streams_are_retried_only_when_replayable(driver: Driver, pod: PeerPod) -> None:
    failing = [pb.MeterValue(energy_wh=1.0, fail_with_code=UNAVAILABLE.value[0])]
    channel = driver.channel(pod.target, retry=policy(methods={UPLOAD}, max_attempts=3))
    assert driver.upload(channel, list(failing)) is UNAVAILABLE
    assert len(pod.servicer.of(UPLOAD)) == 3  # a list is sent again on each attempt
    assert driver.upload(channel, iter(failing)) is UNAVAILABLE
    assert len(pod.servicer.of(UPLOAD)) == 4  # an iterator is used up: sent once
    assert driver.upload(channel, [pb.MeterValue(energy_wh=2.0)] * 2) is OK
    driver.close(channel)


def test_a_response_stream_is_retried_only_before_its_first_message(
    driver: Driver, pod: PeerPod
) -> None:
    pod.servicer.unavailable_streams = 2
    channel = driver.channel(pod.target, retry=policy(methods={WATCH}, max_attempts=3))
    seen = driver.call(channel, "unary_stream")
    assert (seen.code, len(seen.responses)) == (OK, 3)
    assert len(pod.servicer.of(WATCH)) == 3 and len(pod.peers(WATCH)) == 3
    # failing after its messages reached the caller: that status, and sent once
    # (calls.call_aio drops the messages of a stream that fails, so they are not compared)
    seen = driver.call(channel, "unary_stream", fail=UNAVAILABLE.value[0])
    assert seen.code is UNAVAILABLE
    assert len(pod.servicer.of(WATCH)) == 4
    assert wait_until(lambda: driver.stats(channel)[2] == driver.stats(channel)[0], driver)
    driver.close(channel)


def test_the_deadline_holds_across_attempts(driver: Driver, pod: PeerPod) -> None:
    pod.servicer.unavailable = 1000
    fixed = wait_full_jitter(0.3, 1.0, 0.3, rand=lambda: 1.0)
    # An attempt starts only with 0.25 s left: time for a dial and a call on a busy machine,
    # so the last attempt's own status (not its deadline running out) ends the call.
    retry = policy(max_attempts=50, backoff=fixed, deadline_floor_s=0.25)
    channel = driver.channel(pod.target, retry=retry)
    seen = driver.call(channel, timeout=1.0)
    # the call ends with the real status, not a retry that had no time left
    assert seen.code is UNAVAILABLE
    remaining = [a.time_remaining for a in pod.servicer.of(GET)]
    assert 2 <= len(remaining) <= 4
    for number, left in enumerate(remaining):
        # each attempt got what was left of the one deadline: never more than 1 s less the
        # backoff slept before it
        assert left is not None
        assert left <= 1.0 - 0.3 * number + 0.01
    driver.close(channel)


def test_the_budget_caps_retries_during_a_total_outage(driver: Driver, pod: PeerPod) -> None:
    pod.servicer.unavailable = 10_000
    budget = RetryBudget(ratio=0.1, min_per_s=0.1, window_s=10)
    channel = driver.channel(pod.target, retry=policy(max_attempts=3, budget=budget))
    codes = {driver.call(channel).code for _ in range(20)}
    assert codes == {UNAVAILABLE}
    # 20 calls + 10 % of them + a reserve of 1 retry, instead of 20 x 3 attempts
    assert len(pod.servicer.of(GET)) == 23
    assert budget.counts() == (20, 3)
    driver.close(channel)


def test_predialled_connections_serve_the_calls(driver: Driver, pod: PeerPod) -> None:
    channel = driver.channel(pod.target, predial=2)
    for _ in range(3):
        assert wait_until(lambda: driver.ready(channel) == 2, driver)
        assert driver.call(channel).code is OK
    dialled, predialled, _closed = driver.stats(channel)
    assert predialled == 3  # every call went out on a connection dialled before it
    assert dialled >= 3 + 2 - 1
    assert len(pod.peers()) == 3
    driver.close(channel)
    assert driver.ready(channel) == 0
    assert wait_until(lambda: driver.stats(channel)[2] == driver.stats(channel)[0], driver)


def test_a_cancelled_stream_closes_its_connection(driver: Driver, pod: PeerPod) -> None:
    channel = driver.channel(pod.target)
    stub = pb_grpc.ChargePointsStub(channel)
    request = pb.WatchStatusRequest(id="cp-1", updates=1000, interval_ms=20)
    if driver.loop is None:
        call = stub.WatchStatus(request, timeout=30)
        next(call)
        call.cancel()
    else:

        async def cancel() -> None:
            call = stub.WatchStatus(request, timeout=30)
            await call.read()
            call.cancel()

        driver.run(cancel())
    assert wait_until(lambda: driver.stats(channel)[2] == 1, driver)
    driver.close(channel)


def test_a_sync_future_runs_on_its_own_connection(pod: PeerPod) -> None:
    driver = Driver("sync")
    channel = driver.channel(pod.target, predial=1)
    stub = pb_grpc.ChargePointsStub(channel)
    futures = [stub.GetChargePoint.future(get_request(), timeout=10) for _ in range(3)]
    assert [f.result().served_by for f in futures] == ["redial-pod"] * 3
    assert len(pod.peers()) == 3
    assert wait_until(lambda: driver.stats(channel)[2] == 3)  # closed off grpcio's thread
    driver.close(channel)


def test_a_native_retry_policy_in_the_options_is_warned_about(
    driver: Driver, pod: PeerPod, caplog: pytest.LogCaptureFixture
) -> None:
    config = {
        "methodConfig": [
            {
                "name": [{"service": "chargepoints.v1.ChargePoints", "method": "Get"}],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    options = [("grpc.service_config", json.dumps(config))]
    with caplog.at_level(logging.WARNING, logger="grpc_balance_mw.retry"):
        channel = driver.channel(pod.target, options=options, retry=policy())
    assert any("retryPolicy" in r.getMessage() for r in caplog.records)
    assert driver.call(channel).code is OK
    driver.close(channel)


def test_a_closed_channel_refuses_calls(driver: Driver, pod: PeerPod) -> None:
    channel = driver.channel(pod.target)
    driver.close(channel)
    with pytest.raises((ValueError, grpc.aio.UsageError)):
        driver.call(channel)
    assert pod.servicer.attempts == []


# grpcio < 1.84 (measured: 1.49.1 to 1.83.0 do, 1.84.0 does not): a finished grpc.aio call that
# went through a client interceptor or was given a done callback stays in a reference cycle
# (Call -> _AioCall._done_callbacks -> partial(callback, Call); grpc/grpc#43421, fixed by
# grpc/grpc#43121), and its C-core call keeps the closed channel's connection open until the
# cyclic GC collects it (grpc/grpc#42125). There, collect the cycles before counting: what is
# left open then is ours. From 1.84 on, closing must free every connection without a collection.
_AIO_CALLS_IN_CYCLES = tuple(int(p) for p in grpc.__version__.split(".")[:2]) < (1, 84)


def _collect_old_aio_calls(driver: Driver) -> None:
    if driver.loop is not None and _AIO_CALLS_IN_CYCLES:
        gc.collect()


def _fds(driver: Driver) -> int:
    _collect_old_aio_calls(driver)
    return len(os.listdir("/proc/self/fd"))


def _ours() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("grpc-balance-")]


def _client_threads(driver: Driver) -> set[str]:
    """Threads but the test server's workers (its pool grows with the load it sees)."""
    _collect_old_aio_calls(driver)  # grpc.aio's poller thread ends with the last aio object
    return {t.name for t in threading.enumerate() if not t.name.startswith("ThreadPoolExecutor")}


@pytest.mark.slow
def test_close_leaves_no_threads_tasks_or_fds(driver: Driver, pod: PeerPod) -> None:
    warm = driver.channel(pod.target, predial=1)
    for kind in CALL_KINDS:
        driver.call(warm, kind)
    driver.close(warm)
    assert wait_until(lambda: not _ours(), driver)
    threads, fds, described = _client_threads(driver), _fds(driver), open_fds()
    channel = driver.channel(pod.target, predial=2, retry=policy())
    for number in range(600):
        driver.call(channel, CALL_KINDS[number % 4])
    driver.close(channel)
    assert wait_until(lambda: not _ours() and _client_threads(driver) <= threads, driver), (
        _client_threads(driver) - threads
    )
    assert wait_until(lambda: _fds(driver) <= fds, driver, limit_s=10), (
        _fds(driver),
        fds,
        fds_left(described),
        driver.stats(channel),
    )
    if driver.loop is not None:
        tasks = driver.run(_other_tasks())
        assert tasks == []


async def _other_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
@pytest.mark.slow
def test_tls_on_every_dial_never_plaintext(driver: Driver, tmp_path: Path, mutual: bool) -> None:
    require(shutil.which("openssl") is not None, "openssl CLI not installed")
    certs = make_certificates(tmp_path)
    pod = PeerPod(
        grpc.ssl_server_credentials(
            [(certs.key, certs.chain)],
            root_certificates=certs.ca if mutual else None,
            require_client_auth=mutual,
        )
    )
    try:
        pod.servicer.unavailable = 1
        client = (certs.client_key, certs.client_chain) if mutual else (None, None)
        credentials = grpc.ssl_channel_credentials(certs.ca, *client)
        channel = driver.channel(pod.target, credentials, predial=1, retry=policy())
        assert [driver.call(channel).code for _ in range(3)] == [OK] * 3
        attempts = pod.servicer.of(GET)
        assert len(attempts) == 4 and len(pod.peers()) == 4  # a retry, each on a new dial
        assert {tuple(a.security) for a in attempts} == {(b"ssl",)}
        driver.close(channel)
        # every dial is checked: a wrong server name, or no client certificate where the server
        # requires one, fails; nothing falls back to something weaker
        refused = [("grpc.ssl_target_name_override", "other.example")]
        if mutual:
            credentials, refused = grpc.ssl_channel_credentials(certs.ca), []
        wrong = driver.channel(pod.target, credentials, options=refused, retry=policy())
        assert driver.call(wrong, timeout=5).code is UNAVAILABLE
        assert len(pod.servicer.of(GET)) == 4
        driver.close(wrong)
    finally:
        pod.stop()


# -- a pod SIGKILLed under load, through the local cluster's L4 Service ------------------------


@pytest.mark.local_cluster(pods=3, service_time_ms=50)
@pytest.mark.parametrize("retryable", [True, False], ids=["retryable", "not-retryable"])
@pytest.mark.slow
def test_a_killed_pod_costs_no_retryable_call(
    driver: Driver, local_cluster: LocalCluster, retryable: bool
) -> None:
    marked = policy(methods={GET} if retryable else (), max_attempts=5)
    # predialled connections too: those on the killed pod go stale while they wait
    channel = driver.channel(local_cluster.service_target, retry=marked, predial=3)
    calls, kill_at = 150, 40
    codes = _load(driver, channel, local_cluster, calls, kill_at)
    driver.close(channel)
    if retryable:
        assert codes == [OK] * calls
    else:
        # calls in flight on the killed pod fail with its status; none is sent twice
        assert set(codes) <= {OK, UNAVAILABLE}
    served = local_cluster.served()
    assert set(served) == {"charge-points-1", "charge-points-2"}
    assert all(count > 0 for count in served.values())  # spread over the survivors
    if not retryable:
        assert sum(served.values()) <= codes.count(OK)  # a survivor's call succeeded, once


def _load(
    driver: Driver, channel: Any, cluster: LocalCluster, calls: int, kill_at: int
) -> list[grpc.StatusCode]:
    """``calls`` unary calls, 8 at a time; the first pod is SIGKILLed after ``kill_at`` end, when
    about a third of the 8 in flight are on it (all 8 elsewhere: about 4 % of runs)."""
    done = 0
    lock = threading.Lock()

    def one(_: int) -> grpc.StatusCode:
        nonlocal done
        try:
            pb_grpc.ChargePointsStub(channel).GetChargePoint(get_request(), timeout=10)
            code = OK
        except grpc.RpcError as error:
            code = error.code()
        with lock:
            done += 1
            kill = done == kill_at
        if kill:
            cluster.kill("charge-points-0")
        return code

    if driver.loop is None:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(calls)))

    async def run() -> list[grpc.StatusCode]:
        stub = pb_grpc.ChargePointsStub(channel)
        gate = asyncio.Semaphore(8)
        finished = 0

        async def call() -> grpc.StatusCode:
            nonlocal finished
            async with gate:
                try:
                    await stub.GetChargePoint(get_request(), timeout=10)
                    code = OK
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                finished += 1
                if finished == kill_at:
                    await asyncio.to_thread(cluster.kill, "charge-points-0")
                return code

        return list(await asyncio.gather(*(call() for _ in range(calls))))

    return driver.run(run())  # type: ignore[no-any-return]
