"""The routing core's pure decisions: outcomes, release-once tickets, what never left the client."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import grpc
import pytest

from grpc_balance_mw._routing import (
    NO_OUTCOME,
    Outcome,
    Ticket,
    check_channel_options,
    check_metadata,
    error_outcome,
    never_sent,
    outcome_of,
)
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.observing import ObserveOptions

U = grpc.StatusCode.UNAVAILABLE


class Failed(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing: Any = ()) -> None:
        super().__init__(code.name)
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailing


class Router:
    def __init__(self) -> None:
        self.released: list[tuple[str, Outcome, bool]] = []

    def release(self, route: str, outcome: Outcome, in_callback: bool) -> None:
        self.released.append((route, outcome, in_callback))


def test_unavailable_without_a_pod_means_the_pod_is_gone() -> None:
    assert outcome_of(U).pod_gone
    assert not outcome_of(U, ((POD_HEADER, "pod-a"),)).pod_gone  # the pod said it: alive
    assert outcome_of(grpc.StatusCode.DEADLINE_EXCEEDED).timed_out
    assert not outcome_of(grpc.StatusCode.OK).pod_gone
    assert outcome_of(None) is NO_OUTCOME
    assert error_outcome(Failed(U)).pod_gone
    assert error_outcome(ValueError("not a call")) is NO_OUTCOME


def test_a_ticket_releases_once_from_any_number_of_threads() -> None:
    router = Router()
    ticket = Ticket(router, "lane-1")
    threads = [threading.Thread(target=ticket.release, args=(NO_OUTCOME, True)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ticket.release(outcome_of(U)) is False
    assert router.released == [("lane-1", NO_OUTCOME, True)]
    assert ticket.route is None


def test_a_ticket_finalizer_releases_a_dropped_call() -> None:
    class Call:
        pass

    router = Router()
    call = Call()
    ticket = Ticket(router, "lane-2")
    weakref.finalize(call, ticket.release, NO_OUTCOME, True)
    del call
    gc.collect()
    assert router.released == [("lane-2", NO_OUTCOME, True)]


@pytest.mark.parametrize(
    ("error", "sent"),
    [
        (Failed(U, "failed to connect to all addresses; last error: refused"), False),
        (Failed(U, "the balanced channel has no lane with a connection yet"), False),
        (Failed(U, "Socket closed"), True),  # the connection broke under the call
        (Failed(U, "overloaded", ((POD_HEADER, "pod-a"),)), True),
        (Failed(grpc.StatusCode.CANCELLED, ""), True),  # cannot tell: sent, as far as we know
        (ValueError("failed to connect to all addresses"), True),
    ],
)
def test_only_a_call_that_never_left_the_client_counts_as_never_sent(
    error: BaseException, sent: bool
) -> None:
    assert never_sent(error) is not sent


def test_metadata_is_checked_as_grpc_checks_it() -> None:
    check_metadata(None)
    check_metadata((("key", "value"), ("key-bin", b"\x00")))
    for bad in (((42, 42),), (("key", 42),), ("not pairs",), 42):
        with pytest.raises(TypeError):
            check_metadata(bad)


def test_channel_options_must_be_pairs_and_observe_options_are_named() -> None:
    assert check_channel_options(None, "f") == ()
    assert check_channel_options([("grpc.x", 1), ["grpc.y", 2]], "f") == (
        ("grpc.x", 1),
        ["grpc.y", 2],
    )
    with pytest.raises(ConfigurationError, match="ObserveOptions go to observe"):
        check_channel_options(ObserveOptions(), "channel_factory")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="pair"):
        check_channel_options([("grpc.x",)], "channel_factory")
