"""The retry policy's pure core: codes, methods, backoff, deadline, budget; no sockets, no sleep."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import grpc
import pytest
import tenacity
from tenacity import Retrying

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.retry import (
    Deadline,
    MethodSelector,
    RetryBudget,
    RetryPolicy,
    acall_with_retries,
    attempts_bound,
    call_with_retries,
    code_of,
    replayable,
    wait_full_jitter,
    warn_if_native_retry,
)

GET = "/chargepoints.v1.ChargePoints/GetChargePoint"
START = "/chargepoints.v1.ChargePoints/StartCharging"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


class Failed(grpc.RpcError):  # type: ignore[misc]
    """A failed call's error: it has the call's ``code()``."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def run(
    policy: RetryPolicy,
    clock: FakeClock,
    outcomes: list[grpc.StatusCode],
    timeout: float | None = None,
) -> tuple[int, BaseException | None]:
    """Drive one call with the policy (:func:`call_with_retries`, which hands tenacity a failed
    first attempt); each attempt takes 10 ms of fake time."""
    attempts = 0
    deadline = Deadline(timeout, clock)

    def attempt() -> str:
        nonlocal attempts
        code = outcomes[min(attempts, len(outcomes) - 1)]
        attempts += 1
        clock.now += 0.01
        if code is not grpc.StatusCode.OK:
            raise Failed(code)
        return "ok"

    policy.record_call()
    try:
        call_with_retries(policy, deadline, attempt, clock.sleep)
    except Failed as error:
        return attempts, error
    return attempts, None


U, OK = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK


def policy(clock: FakeClock, **kwargs: Any) -> RetryPolicy:
    kwargs.setdefault("methods", {GET})
    kwargs.setdefault("budget", RetryBudget(clock=clock))
    kwargs.setdefault("backoff", wait_full_jitter(rand=lambda: 1.0))
    return RetryPolicy(**kwargs)


def test_unavailable_is_retried_until_success() -> None:
    clock = FakeClock()
    assert run(policy(clock), clock, [U, U, OK]) == (3, None)


def test_max_attempts_ends_with_the_last_original_error() -> None:
    clock = FakeClock()
    attempts, error = run(policy(clock, max_attempts=4), clock, [U])
    assert attempts == 4
    assert code_of(error) is U


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_codes_fail_at_once_with_their_status(code: grpc.StatusCode) -> None:
    clock = FakeClock()
    attempts, error = run(policy(clock), clock, [code, OK])
    assert (attempts, code_of(error)) == (1, code)


def test_codes_are_configurable() -> None:
    clock = FakeClock()
    retrying = policy(clock, codes={grpc.StatusCode.RESOURCE_EXHAUSTED})
    assert run(retrying, clock, [grpc.StatusCode.RESOURCE_EXHAUSTED, OK]) == (2, None)
    assert run(retrying, clock, [U, OK])[0] == 1


def test_nothing_is_retryable_unless_marked() -> None:
    default = RetryPolicy()
    assert not default.retryable(GET, streaming=False)
    marked = RetryPolicy(methods={GET})
    assert marked.retryable(GET, streaming=False)
    assert not marked.retryable(START, streaming=False)
    assert not RetryPolicy(methods={GET}, max_attempts=1).retryable(GET, streaming=False)


def test_methods_by_service_wildcard_predicate_and_bytes() -> None:
    by_service = MethodSelector({"/chargepoints.v1.ChargePoints/*"})
    assert by_service(GET) and by_service(START.encode())
    assert not by_service("/other.v1.Other/Get")
    by_predicate = RetryPolicy(methods=lambda name: name.endswith("/GetChargePoint"))
    assert by_predicate.retryable(GET, streaming=False)
    assert not by_predicate.retryable(START, streaming=False)


@pytest.mark.parametrize("bad", ["GetChargePoint", "/svc/", "/a/b/c"])
def test_a_method_that_is_not_a_full_name_is_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="full method name"):
        MethodSelector({bad})


def test_a_single_string_is_refused_rather_than_read_as_characters() -> None:
    with pytest.raises(ConfigurationError, match="collection"):
        RetryPolicy(methods=GET)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"codes": {grpc.StatusCode.OK}}, {"codes": {14}}],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)


def test_streaming_requests_are_retried_only_when_replayable() -> None:
    marked = RetryPolicy(methods={GET})
    assert replayable([1, 2]) and replayable(())
    assert not replayable(iter([1, 2])) and not replayable(x for x in [1])
    assert marked.retryable(GET, [1, 2], streaming=True)
    assert not marked.retryable(GET, iter([1, 2]), streaming=True)


def test_backoff_grows_to_its_cap_with_full_jitter() -> None:
    top = wait_full_jitter(0.1, 2.0, 0.5, rand=lambda: 1.0)
    assert [top.ceiling(n) for n in (1, 2, 3, 4, 100)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    draws = iter([0.0, 0.5])
    jittered = wait_full_jitter(0.1, 2.0, 0.5, rand=lambda: next(draws))
    clock = FakeClock()
    retrying = policy(clock, backoff=jittered)
    before = clock.now
    assert run(retrying, clock, [U, U, OK]) == (3, None)
    # three attempts of 10 ms, sleeps of 0 * 0.1 and 0.5 * 0.2
    assert clock.now - before == pytest.approx(0.03 + 0.0 + 0.1)


def test_the_deadline_holds_across_attempts_and_sleeps() -> None:
    clock = FakeClock()
    slow = wait_full_jitter(0.2, 1.0, 0.2, rand=lambda: 1.0)
    before = clock.now
    attempts, error = run(policy(clock, max_attempts=10, backoff=slow), clock, [U], timeout=0.5)
    # 10 ms + 200 ms sleep + 10 ms + 200 ms sleep + 10 ms = 430 ms; another sleep would pass 0.5
    assert (attempts, code_of(error)) == (3, U)
    assert clock.now - before <= 0.5


def test_no_attempt_starts_with_less_than_the_floor_left() -> None:
    clock = FakeClock()
    fixed = wait_full_jitter(0.09, 1.0, 0.09, rand=lambda: 1.0)
    retrying = policy(clock, max_attempts=5, backoff=fixed, deadline_floor_s=0.05)
    # after attempt 1 (10 ms) and a 90 ms sleep, 0.1 s would be left of 0.2: fine; after
    # attempt 2, 0.09 - 0.09 = 0 < 0.05: stop with the real status.
    assert run(retrying, clock, [U], timeout=0.2)[0] == 2


def test_deadline_without_timeout_is_none() -> None:
    clock = FakeClock()
    assert Deadline(None, clock).remaining() is None
    deadline = Deadline(1.0, clock)
    clock.now += 2
    assert deadline.remaining() == 0.0


def test_the_budget_caps_retries_during_a_total_outage() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.5, window_s=10, clock=clock)
    retrying = policy(clock, budget=budget, max_attempts=3, backoff=wait_full_jitter(0, 1, 0))
    attempts = sum(run(retrying, clock, [U])[0] for _ in range(100))
    # 100 calls, every attempt fails: 20 % of 100 + 5 reserve = 25 retries, not 200.
    assert attempts == 125 == attempts_bound(retrying, 100)
    assert budget.counts() == (100, 25)


def test_the_reserve_lets_a_quiet_client_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_s=0.3, window_s=10, clock=clock)
    retrying = policy(clock, budget=budget, max_attempts=2)
    results = [run(retrying, clock, [U, OK])[1] is None for _ in range(4)]
    assert results == [True, True, True, False]


def test_the_budget_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_s=0.1, window_s=10, buckets=10, clock=clock)
    assert budget.try_retry()
    assert not budget.try_retry()
    clock.now += 5
    assert not budget.try_retry()
    clock.now += 5.5
    assert budget.try_retry()
    assert "1 retries" in repr(budget)


def test_the_budget_is_charged_only_for_retries_that_happen() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_s=1, window_s=10, clock=clock)
    retrying = policy(clock, budget=budget, max_attempts=2)
    for _ in range(3):
        run(retrying, clock, [U])  # one retry each, then max_attempts stops (not the budget)
    assert budget.counts() == (3, 3)
    run(retrying, clock, [grpc.StatusCode.INTERNAL])  # not retryable: nothing charged
    assert budget.counts() == (4, 3)


def test_without_a_budget_every_call_gets_its_attempts() -> None:
    clock = FakeClock()
    retrying = policy(clock, budget=None, max_attempts=3)
    assert sum(run(retrying, clock, [U])[0] for _ in range(50)) == 150


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"ratio": -1}, "ratio"), ({"window_s": 0}, "window_s"), ({"buckets": 0}, "buckets")],
)
def test_bad_budgets_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RetryBudget(**kwargs)


def service_config(**policy: Any) -> list[tuple[str, Any]]:
    config = {"methodConfig": [{"name": [{"service": "chargepoints.v1.ChargePoints"}], **policy}]}
    return [("grpc.service_config", json.dumps(config))]


RETRY_POLICY = {
    "retryPolicy": {
        "maxAttempts": 4,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
}


def test_a_native_retry_policy_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    options = service_config(**RETRY_POLICY, timeout="7s")
    with caplog.at_level(logging.WARNING, logger="grpc_balance_mw.retry"):
        assert warn_if_native_retry(options, "charge-points:50051")
        assert warn_if_native_retry(options, "charge-points:50051")
    warnings = [r for r in caplog.records if "retryPolicy" in r.getMessage()]
    assert len(warnings) == 1
    assert "charge-points:50051" in warnings[0].getMessage()
    assert "grpc.enable_retries" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "options",
    [
        None,
        [("grpc.lb_policy_name", "round_robin")],
        service_config(timeout="1s"),
        [*service_config(**RETRY_POLICY), ("grpc.enable_retries", 0)],
        [("grpc.service_config", "{not json")],
    ],
)
def test_no_warning_without_a_native_retry_policy(
    options: list[tuple[str, Any]] | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="grpc_balance_mw.retry"):
        assert not warn_if_native_retry(options)
    assert not caplog.records


def test_hedging_counts_as_native_retries() -> None:
    hedging = {"hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "0.05s"}}
    assert warn_if_native_retry(service_config(**hedging))


def test_code_of_reads_only_grpc_status_codes() -> None:
    assert code_of(Failed(U)) is U
    assert code_of(ValueError("x")) is None
    assert code_of(None) is None
    weird: Callable[[], int] = lambda: 14  # noqa: E731
    holder = type("Holder", (Exception,), {"code": staticmethod(weird)})()
    assert code_of(holder) is None


def test_a_first_attempt_that_succeeds_builds_no_tenacity(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(tenacity, "Retrying", None)  # building it would fail the call
    assert run(policy(clock), clock, [OK]) == (1, None)
    monkeypatch.undo()
    assert run(policy(clock), clock, [U, OK]) == (2, None)


@pytest.mark.parametrize(
    "outcomes", [[U, U, OK], [U], [grpc.StatusCode.INTERNAL], [U, grpc.StatusCode.INTERNAL]]
)
def test_the_driver_and_tenacity_alone_agree_attempt_for_attempt(
    outcomes: list[grpc.StatusCode],
) -> None:
    clock, direct_clock = FakeClock(), FakeClock()
    attempts, error = run(policy(clock, max_attempts=4), clock, outcomes)
    calls = iter(outcomes + [outcomes[-1]] * 4)
    direct = policy(direct_clock, max_attempts=4)
    direct.record_call()
    seen = 0

    def attempt() -> str:
        nonlocal seen
        seen += 1
        direct_clock.now += 0.01
        if (code := next(calls)) is not OK:
            raise Failed(code)
        return "ok"

    with pytest.raises(Failed) if error is not None else nullcontext():
        Retrying(sleep=direct_clock.sleep, **direct.tenacity_kwargs(Deadline(None)))(attempt)
    assert (attempts, clock.now) == (seen, direct_clock.now)


def test_other_errors_of_a_first_attempt_propagate_as_they_are() -> None:
    clock = FakeClock()

    def broken() -> str:
        raise TypeError("the request did not serialize")

    with pytest.raises(TypeError, match="serialize"):
        call_with_retries(policy(clock), Deadline(None), broken, clock.sleep)


def test_the_async_driver_retries_like_the_sync_one() -> None:
    clock = FakeClock()
    outcomes = iter([U, U, OK])
    attempts = 0

    async def attempt() -> str:
        nonlocal attempts
        attempts += 1
        if (code := next(outcomes)) is not OK:
            raise Failed(code)
        return "ok"

    async def sleep(seconds: float) -> None:
        clock.sleep(seconds)

    retried = policy(clock)
    assert asyncio.run(acall_with_retries(retried, Deadline(None), attempt, sleep)) == "ok"
    assert attempts == 3
