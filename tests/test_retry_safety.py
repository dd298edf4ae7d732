"""Retry safety through the balanced channel: during a total outage the retry budget holds (the
pod's own count of attempts), and a native gRPC retryPolicy that would stack with ours is warned
about. (The same for the dial-per-request channel: tests/test_redial.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from fault_load import GET, MODES, UNAVAILABLE, close_channel, load, open_channel
from redial_fixtures import PeerPod

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import PoolConfig
from grpc_balance_mw.retry import RetryBudget, RetryPolicy, attempts_bound, wait_full_jitter


@pytest.fixture
def pod() -> Iterator[PeerPod]:
    made = PeerPod()
    yield made
    made.stop()


@pytest.mark.parametrize("mode", MODES)
def test_the_budget_holds_through_the_balanced_channel_in_a_total_outage(
    pod: PeerPod, mode: str
) -> None:
    pod.servicer.unavailable = 10**9  # every GetChargePoint fails UNAVAILABLE
    calls = 100
    budget = RetryBudget(ratio=0.2, min_per_s=0.5, window_s=60)
    policy = RetryPolicy(
        methods={GET}, max_attempts=5, backoff=wait_full_jitter(0.0, 1.0, 0.0), budget=budget
    )

    dials: list[int] = []

    async def main() -> list[grpc.StatusCode]:
        channel = open_channel(
            mode, "balanced", pod.target, retry=policy,
            pool_config=PoolConfig(min_lanes=1, scout_interval_s=None),
            observe=ObserveOptions(registry=AffinityRegistry()),
        )  # fmt: skip
        try:
            return [o.code for o in await load(mode, channel, "unary_unary", calls, 4)]
        finally:
            dials.append(channel.pool.dials)
            await close_channel(mode, channel)

    codes = asyncio.run(main())
    # The pod answered every UNAVAILABLE itself (its trailers name it): it is alive, so its
    # lanes stay; redialling on each answer would add connections to the outage's load.
    assert dials == [1]
    assert codes == [UNAVAILABLE] * calls  # the original status, after the retries allowed
    attempts = len(pod.servicer.of(GET))
    seen_calls, retries = budget.counts()
    assert seen_calls == calls
    assert attempts == calls + retries  # every retry the budget granted, and no other
    assert retries <= 0.2 * calls + 0.5 * 60  # 20 % of calls plus the reserve
    assert attempts <= attempts_bound(policy, calls) < calls * policy.max_attempts


_NATIVE = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "chargepoints.v1.ChargePoints"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


@pytest.mark.parametrize("mode", MODES)
def test_a_native_retry_policy_on_a_balanced_channel_is_warned_about(
    pod: PeerPod, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = f"localhost:{pod.port}"  # a target of its own: the warning is once per target
    options = [("grpc.service_config", _NATIVE)]

    async def open_and_close(retry: RetryPolicy) -> None:
        channel = open_channel(
            mode, "balanced", f"{target}" if mode == "sync" else f"ipv4:127.0.0.1:{pod.port}",
            options=options, retry=retry, observe=False,
        )  # fmt: skip
        await close_channel(mode, channel)

    with caplog.at_level(logging.WARNING, logger="grpc_balance_mw"):
        asyncio.run(open_and_close(RetryPolicy(max_attempts=1, budget=None)))
        assert "retryPolicy" not in caplog.text  # nothing of ours to stack with
        asyncio.run(open_and_close(RetryPolicy(methods={GET})))
    assert "native gRPC retryPolicy" in caplog.text
    assert "('grpc.enable_retries', 0)" in caplog.text
