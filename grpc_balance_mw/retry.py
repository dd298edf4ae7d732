"""Retry policy for calls the package redials: pure, tenacity-shaped, clock and random injected.

Which calls may be sent again, and when, is decided here without any grpc I/O (only the
``grpc.StatusCode`` enum is used), so the sync and asyncio adapters share one policy and tests
drive it with a fake clock::

    policy = RetryPolicy(
        methods={"/chargepoints.v1.ChargePoints/GetChargePoint"},   # idempotent methods only
        codes={grpc.StatusCode.UNAVAILABLE},                       # the default
        max_attempts=3,
    )

The pieces are tenacity strategies (``retry_base``, ``wait_base``, ``stop_base`` subclasses), so
they combine with tenacity's own with ``|`` and ``&``, and an adapter drives them with
``tenacity.Retrying`` / ``AsyncRetrying`` (see :meth:`RetryPolicy.tenacity_kwargs`); they are
named in lower case like tenacity's, so call sites read alike:

- :class:`retry_if_code`: retry on these status codes (UNAVAILABLE by default);
- :class:`MethodSelector`: which methods are idempotent; nothing is retried unless marked;
- :class:`wait_full_jitter`: exponential backoff with full jitter, as gRPC's retry policy;
- :class:`stop_at_deadline`: never sleep past the whole call's deadline, nor start an attempt
  with less than a floor of time left;
- :class:`RetryBudget` / :class:`stop_when_budget_spent`: retries are at most a fraction of
  calls, plus a small reserve (Finagle's RetryBudget, Envoy's retry budget, gRPC's retry
  throttling), so retries cannot multiply the load on a service that is down.

:func:`warn_if_native_retry` warns, once, when a channel's ``grpc.service_config`` carries a
native ``retryPolicy`` (or ``hedgingPolicy``) that would stack with these retries.

:func:`call_with_retries` / :func:`acall_with_retries` drive one call: its first attempt runs
bare, and tenacity is built only when that attempt fails (building ``tenacity.Retrying`` per call
cost a balanced channel about 60 us of client CPU per call, a fifth of a warm unary call).
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import tenacity
from tenacity import RetryCallState
from tenacity.retry import retry_base
from tenacity.stop import stop_after_attempt, stop_any, stop_base
from tenacity.wait import wait_base

from grpc_balance_mw._routing import never_sent
from grpc_balance_mw.errors import ConfigurationError

__all__ = [
    "NO_RETRY",
    "Deadline",
    "MethodSelector",
    "RetryBudget",
    "RetryPolicy",
    "acall_with_retries",
    "attempts_bound",
    "call_with_retries",
    "code_of",
    "replayable",
    "retry_if_code",
    "retry_if_never_sent",
    "stop_at_deadline",
    "stop_when_budget_spent",
    "wait_full_jitter",
    "warn_if_native_retry",
]

_log = logging.getLogger(__name__)

Clock = Callable[[], float]


def code_of(error: BaseException | None) -> grpc.StatusCode | None:
    """The status code of a failed call's error (``grpc.RpcError``, ``grpc.aio.AioRpcError``)."""
    code = getattr(error, "code", None)
    if not callable(code):
        return None
    try:
        value = code()
    except TypeError:  # a ``code`` that is not grpc's zero-argument accessor
        return None
    return value if isinstance(value, grpc.StatusCode) else None


def replayable(request: object) -> bool:
    """Whether a streaming request can be sent again: only a list or tuple, which every attempt
    iterates from its start. An iterator or generator is consumed by the first attempt."""
    return isinstance(request, (list, tuple))


class Deadline:
    """The whole call's deadline, across attempts; ``None`` timeout: no deadline."""

    def __init__(self, timeout_s: float | None, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.at = None if timeout_s is None else clock() + timeout_s

    def remaining(self) -> float | None:
        """Seconds left (never below 0), or None without a deadline."""
        return None if self.at is None else max(0.0, self.at - self._clock())

    def __repr__(self) -> str:
        remaining = self.remaining()
        return "<Deadline none>" if remaining is None else f"<Deadline in {remaining:.3f}s>"


class MethodSelector:
    """Which methods are idempotent, so may be sent again.

    Args:
        methods: full method names (``/package.Service/Method``); ``/package.Service/*`` marks
            every method of a service.
        predicate: or a function of the full method name.
    """

    def __init__(
        self,
        methods: Iterable[str] = (),
        predicate: Callable[[str], bool] | None = None,
    ) -> None:
        names = frozenset(methods)
        for name in names:
            if not (name.startswith("/") and name.count("/") == 2 and not name.endswith("/")):
                raise ConfigurationError(
                    f"retryable method {name!r} is not a full method name "
                    "('/package.Service/Method' or '/package.Service/*')"
                )
        self._exact = frozenset(n for n in names if not n.endswith("/*"))
        self._services = frozenset(n[:-1] for n in names if n.endswith("/*"))
        self._predicate = predicate

    def __call__(self, method: str | bytes) -> bool:
        name = method.decode() if isinstance(method, bytes) else method
        if name in self._exact:
            return True
        if self._services and name[: name.rfind("/") + 1] in self._services:
            return True
        return self._predicate is not None and bool(self._predicate(name))

    def __repr__(self) -> str:
        marked = sorted(self._exact) + sorted(s + "*" for s in self._services)
        if self._predicate is not None:
            marked.append(repr(self._predicate))
        return f"<MethodSelector {marked or 'nothing'}>"


class retry_if_code(retry_base):
    """Retry when the attempt failed with one of these status codes."""

    def __init__(self, codes: Collection[grpc.StatusCode]) -> None:
        self.codes = frozenset(codes)

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        return code_of(outcome.exception()) in self.codes


class retry_if_never_sent(retry_base):
    """Retry when the attempt provably never left the client (no connection could be made):
    safe for any method, idempotent or not (:func:`grpc_balance_mw._routing.never_sent`)."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        return never_sent(outcome.exception())


class wait_full_jitter(wait_base):
    """Sleep a uniform random time up to ``min(initial * multiplier**(n-1), maximum)`` before
    retry ``n``: gRPC's retry backoff ("full jitter"), which spreads the retries of clients
    that failed together."""

    def __init__(
        self,
        initial_s: float = 0.05,
        multiplier: float = 2.0,
        maximum_s: float = 1.0,
        *,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if initial_s < 0 or maximum_s < 0 or multiplier < 1:
            raise ConfigurationError(
                "backoff needs initial_s >= 0, maximum_s >= 0 and multiplier >= 1, got "
                f"{initial_s}, {maximum_s}, {multiplier}"
            )
        self.initial_s = initial_s
        self.multiplier = multiplier
        self.maximum_s = maximum_s
        self._rand = rand

    def ceiling(self, attempt: int) -> float:
        """The longest sleep after failed attempt ``attempt`` (1-based)."""
        exponent = min(attempt - 1, 64)  # no float overflow on absurd attempt counts
        return min(self.initial_s * self.multiplier**exponent, self.maximum_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        return self._rand() * self.ceiling(retry_state.attempt_number)


class stop_at_deadline(stop_base):
    """Stop when the next attempt would start with less than ``floor_s`` of the call's deadline
    left after the upcoming sleep: the call then fails with its last real status rather than
    a DEADLINE_EXCEEDED of an attempt that never had a chance."""

    def __init__(self, deadline: Deadline, floor_s: float = 0.005) -> None:
        self.deadline = deadline
        self.floor_s = floor_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        remaining = self.deadline.remaining()
        if remaining is None:
            return False
        return remaining - retry_state.upcoming_sleep < self.floor_s


class RetryBudget:
    """Retries allowed: at most ``ratio`` of the calls seen in the last ``window_s``, plus a
    reserve of ``min_per_s`` retries per second for clients that make few calls.

    The same budget as Finagle's ``RetryBudget`` (defaults 20 % and 10/s over 10 s) and in
    spirit Envoy's retry budget and gRPC's retry throttling: during an outage, where every
    attempt fails, retries add at most ``ratio`` to the load instead of multiplying it by the
    number of attempts. Thread-safe; counts live in ``buckets`` slices of the window.

    Args:
        ratio: retries per call allowed (0.2: at most one retry per five calls).
        min_per_s: retries per second always allowed (the reserve).
        window_s: how far back calls and retries count.
        clock: monotonic seconds; injected in tests.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        window_s: float = 10.0,
        *,
        buckets: int = 10,
        clock: Clock = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_s < 0 or window_s <= 0 or buckets < 1:
            raise ConfigurationError(
                "retry budget needs ratio >= 0, min_per_s >= 0, window_s > 0 and buckets >= 1, "
                f"got {ratio}, {min_per_s}, {window_s}, {buckets}"
            )
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self._slice_s = window_s / buckets
        self._clock = clock
        self._lock = threading.Lock()
        # slice index -> [calls, retries]; only slices within the window are kept.
        self._slices: dict[int, list[int]] = {}

    def _current(self) -> list[int]:
        now = int(self._clock() // self._slice_s)
        oldest = now - round(self.window_s / self._slice_s) + 1
        for index in [i for i in self._slices if i < oldest]:
            del self._slices[index]
        return self._slices.setdefault(now, [0, 0])

    def record_call(self) -> None:
        """Count one call (its first attempt); every call earns ``ratio`` of a retry."""
        with self._lock:
            self._current()[0] += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (nothing taken) when it is spent."""
        with self._lock:
            current = self._current()
            calls = sum(s[0] for s in self._slices.values())
            retries = sum(s[1] for s in self._slices.values())
            if retries + 1 > self.ratio * calls + self.min_per_s * self.window_s:
                return False
            current[1] += 1
            return True

    def counts(self) -> tuple[int, int]:
        """(calls, retries) within the window."""
        with self._lock:
            self._current()
            return (
                sum(s[0] for s in self._slices.values()),
                sum(s[1] for s in self._slices.values()),
            )

    def __repr__(self) -> str:
        calls, retries = self.counts()
        return (
            f"<RetryBudget {retries} retries / {calls} calls in {self.window_s:g}s, "
            f"ratio {self.ratio:g} + {self.min_per_s:g}/s>"
        )


class stop_when_budget_spent(stop_base):
    """Stop when the budget allows no more retries; a retry that goes ahead is taken from it.

    Put it last in a ``|`` chain: tenacity's ``stop_any`` asks in order and stops at the first
    yes, so the budget is only charged for a retry that will really happen.
    """

    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return not self.budget.try_retry()


@dataclass(frozen=True)
class RetryPolicy:
    """Which calls are sent again, how often, how far apart; shared by the sync and aio adapters.

    Args:
        methods: the idempotent methods: full method names (``/pkg.Service/Method``, or
            ``/pkg.Service/*``), a predicate of the full name, or a :class:`MethodSelector`.
            Nothing is retried unless marked here: a call that reached a server may have acted.
        codes: status codes that make a call retryable.
        max_attempts: attempts per call, the first included (1: never retry). The default
            (10, with the default backoff about 3 s of sleeps in all) rides out a restarted
            Service or a rolling update: attempts go on until the call's deadline, the
            budget or this cap ends them, rather than giving up within 150 ms.
        backoff: the sleep before each retry (a tenacity wait strategy).
        budget: the retry budget; None: unlimited (not recommended). One budget object is
            shared by every channel given this policy.
        deadline_floor_s: do not start an attempt with less than this left of the deadline.
    """

    methods: MethodSelector | Callable[[str], bool] | Iterable[str] = ()
    codes: Collection[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    max_attempts: int = 10
    backoff: wait_base = field(default_factory=wait_full_jitter)
    budget: RetryBudget | None = field(default_factory=RetryBudget)
    deadline_floor_s: float = 0.005

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.deadline_floor_s < 0:
            raise ConfigurationError(f"deadline_floor_s must be >= 0, got {self.deadline_floor_s}")
        object.__setattr__(self, "codes", frozenset(self.codes))
        for code in self.codes:
            if not isinstance(code, grpc.StatusCode):
                raise ConfigurationError(f"retryable codes must be grpc.StatusCode, got {code!r}")
        if grpc.StatusCode.OK in self.codes:
            raise ConfigurationError("OK is not a failure to retry")
        selector = self.methods
        if not isinstance(selector, MethodSelector):
            if callable(selector):
                selector = MethodSelector(predicate=selector)
            elif isinstance(selector, (str, bytes)):
                raise ConfigurationError("methods takes a collection of method names, not one")
            else:
                selector = MethodSelector(selector)
        object.__setattr__(self, "methods", selector)

    @property
    def selector(self) -> MethodSelector:
        assert isinstance(self.methods, MethodSelector)  # normalised in __post_init__
        return self.methods

    def retryable(self, method: str | bytes, request: object = None, *, streaming: bool) -> bool:
        """Whether this call may be attempted more than once at all.

        Args:
            method: the full method name.
            request: the request (or, for a request stream, what the caller passed).
            streaming: whether the call streams requests: then only a list or tuple, which can
                be replayed, makes it retryable.
        """
        if self.max_attempts < 2 or not self.selector(method):
            return False
        return not streaming or replayable(request)

    def may_resend(self, request: object = None, *, streaming: bool) -> bool:
        """Whether this call could be sent again at all, idempotent or not: a call that never
        left the client may be (:func:`~grpc_balance_mw._routing.never_sent`)."""
        return self.max_attempts > 1 and (not streaming or replayable(request))

    def retries(self, error: BaseException, *, idempotent: bool) -> bool:
        """Whether a failed attempt is worth another (before the stop strategies are asked):
        a retryable code of an idempotent call, or a call that never left the client. Asked
        first, so tenacity is built only for failures it would retry."""
        return (idempotent and code_of(error) in self.codes) or never_sent(error)

    def record_call(self) -> None:
        """Count a call (every call, retryable or not) into the budget."""
        if self.budget is not None:
            self.budget.record_call()

    def tenacity_kwargs(self, deadline: Deadline, *, idempotent: bool = True) -> dict[str, Any]:
        """``retry``, ``wait`` and ``stop`` for one call's ``tenacity.Retrying``/``AsyncRetrying``.

        The failed attempt's own error is raised when retries end (pass ``reraise=True``).
        ``idempotent``: the method is marked, so its retryable codes count; any call is
        retried when it never left the client.
        """
        stops: Sequence[stop_base] = [
            stop_after_attempt(self.max_attempts),
            stop_at_deadline(deadline, self.deadline_floor_s),
        ]
        if self.budget is not None:
            stops = [*stops, stop_when_budget_spent(self.budget)]  # last: charged only if retried
        retry: retry_base = retry_if_never_sent()
        if idempotent:
            retry = retry_if_code(self.codes) | retry
        return {
            "retry": retry,
            "wait": self.backoff,
            "stop": stop_any(*stops),
            "reraise": True,
        }


NO_RETRY = RetryPolicy(max_attempts=1, budget=None)

T = TypeVar("T")


def call_with_retries(
    policy: RetryPolicy,
    deadline: Deadline,
    attempt: Callable[[], T],
    sleep: Callable[[float], None],
    *,
    idempotent: bool = True,
) -> T:
    """``attempt()`` under ``policy``, as ``tenacity.Retrying(**policy.tenacity_kwargs(deadline))``
    would run it, at no cost when the first attempt succeeds.

    The first attempt runs bare; only if it raises a ``grpc.RpcError`` is tenacity built, and
    it is handed that failure as its own first attempt (replayed, not sent again), so its retry,
    wait and stop strategies, the budget included, see exactly the attempts they would have.
    Anything else the first attempt raises propagates as is, as tenacity would re-raise it,
    and so does a failure that would not be retried (:meth:`RetryPolicy.retries`): tenacity
    is built only for failures it would retry.
    """
    try:
        return attempt()
    except grpc.RpcError as error:
        if not policy.retries(error, idempotent=idempotent):
            raise
        failed: BaseException | None = error

    def again() -> T:
        nonlocal failed
        if failed is not None:
            error, failed = failed, None
            raise error
        return attempt()

    kwargs = policy.tenacity_kwargs(deadline, idempotent=idempotent)
    return tenacity.Retrying(sleep=sleep, **kwargs)(again)


async def acall_with_retries(
    policy: RetryPolicy,
    deadline: Deadline,
    attempt: Callable[[], Awaitable[T]],
    sleep: Callable[[float], Awaitable[None]],
    *,
    idempotent: bool = True,
) -> T:
    """:func:`call_with_retries` for coroutines (``tenacity.AsyncRetrying``)."""
    try:
        return await attempt()
    except grpc.RpcError as error:
        if not policy.retries(error, idempotent=idempotent):
            raise
        failed: BaseException | None = error

    async def again() -> T:
        nonlocal failed
        if failed is not None:
            error, failed = failed, None
            raise error
        return await attempt()

    kwargs = policy.tenacity_kwargs(deadline, idempotent=idempotent)
    retrying = tenacity.AsyncRetrying(sleep=sleep, **kwargs)
    return await retrying(again)


_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _option(options: Iterable[tuple[str, Any]] | None, name: str) -> Any:
    found = None
    for key, value in options or ():
        if key == name:
            found = value  # the last one wins, as in grpc's channel args
    return found


def warn_if_native_retry(options: Iterable[tuple[str, Any]] | None, target: str = "") -> bool:
    """Warn (once per target and service config) if the channel options enable gRPC's retries.

    A ``retryPolicy`` or ``hedgingPolicy`` in the ``grpc.service_config`` option makes gRPC core
    retry inside each attempt of ours: up to ``maxAttempts`` x our ``max_attempts`` sends, and
    past our retry budget. ``("grpc.enable_retries", 0)`` turns gRPC's retries off.

    Returns:
        Whether the options would stack retries (whether or not the warning was logged now).
    """
    options = list(options or ())
    if _option(options, "grpc.enable_retries") in (0, False):
        return False
    config = _option(options, "grpc.service_config")
    if not config:
        return False
    try:
        parsed = json.loads(config)
    except (TypeError, ValueError):
        return False  # grpc rejects it when the channel is made, with its own message
    method_configs = parsed.get("methodConfig", ()) if isinstance(parsed, dict) else ()
    policies = [
        key
        for entry in method_configs
        if isinstance(entry, dict)
        for key in ("retryPolicy", "retry_policy", "hedgingPolicy", "hedging_policy")
        if key in entry
    ]
    if not policies:
        return False
    with _warned_lock:
        first = (target, config) not in _warned
        _warned.add((target, config))
    if first:
        _log.warning(
            "channel to %s has a native gRPC %s in its grpc.service_config: gRPC core retries "
            "inside every attempt of grpc_balance_mw's retries, so attempts multiply and bypass "
            "the retry budget. Remove it from the service config, or add the channel option "
            "('grpc.enable_retries', 0).",
            target or "?",
            policies[0],
        )
    return True


def attempts_bound(policy: RetryPolicy, calls: int) -> int:
    """The most attempts ``calls`` calls can make within one budget window (for reasoning and
    tests): every call once, plus what the budget lets through, capped by ``max_attempts``."""
    if policy.budget is None:
        return calls * policy.max_attempts
    budget = policy.budget
    allowed = math.floor(budget.ratio * calls + budget.min_per_s * budget.window_s)
    return calls + min(allowed, calls * (policy.max_attempts - 1))
