"""Per-target objects live as long as their channels, a closed channel stops its probe, and
no health check holds a balanced channel's maintenance past its deadline."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from grpc_balance_mw.affinity import AffinityRegistry, default_registry
from grpc_balance_mw.aio import balanced as aio_channel_module
from grpc_balance_mw.aio import interceptors as aio_client
from grpc_balance_mw.aio.balanced import BalancedChannel as AioBalancedChannel
from grpc_balance_mw.aio.balanced import channel_factory as aio_channel_factory
from grpc_balance_mw.balanced import check_result
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.interceptors import AffinityInterceptor
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import CheckResult
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.telemetry import AffinityTelemetry

pytestmark = pytest.mark.timeout(60)


@pytest.mark.leaves(
    threads=("grpc_balance_mw resolver",),
    reason="the resolver drains the .invalid names queued here, one DNS timeout each, after it",
)
def test_the_default_registry_and_telemetry_let_go_of_closed_channels() -> None:
    telemetry = AffinityTelemetry(spans=False, metrics=False)
    before = len(default_registry)
    for i in range(300):
        target = f"lifetime-{i}.invalid:1"
        with observe(
            grpc.insecure_channel(target), ObserveOptions(telemetry=telemetry), target=target
        ):
            pass
    gc.collect()
    # Only the keep_recent targets used last stay, for channels made per call to share.
    assert len(default_registry) <= before + default_registry.keep_recent
    assert repr(telemetry) == "<AffinityTelemetry watching 0 targets>"


def test_a_live_channel_keeps_its_detector_and_new_channels_share_it() -> None:
    registry = AffinityRegistry(keep_recent=2)
    kept = observe(
        grpc.insecure_channel("a.invalid:1"),
        ObserveOptions(registry=registry),
        target="a.invalid:1",
    )
    for i in range(20):
        registry.detector(f"other-{i}.invalid:1")
    gc.collect()
    assert registry.detector("a.invalid:1") is kept.detector
    assert len(registry) <= 3
    kept.close()


class BlackHole:
    """Accepts connections and never answers: a health check waits out its whole deadline."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connected = threading.Event()
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            self.connected.set()

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(); shutdown() does (Linux).
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def black_hole() -> Iterator[BlackHole]:
    hole = BlackHole()
    yield hole
    hole.close()


@pytest.mark.parametrize("owner", ["channel", "interceptor", "aio-interceptor"])
def test_closing_ends_a_probe_round_in_flight(black_hole: BlackHole, owner: str) -> None:
    probe_timeout_s = 30.0
    registry = AffinityRegistry()
    target = black_hole.target
    if owner == "channel":
        observed: Any = observe(
            grpc.insecure_channel(target),
            ObserveOptions(probe=True, probe_credentials="insecure", registry=registry),
            target=target,
        )
    elif owner == "interceptor":
        observed = AffinityInterceptor(
            target, ObserveOptions(probe=True, probe_credentials="insecure", registry=registry)
        )
    else:
        observed = aio_client.AffinityInterceptors(
            target, ObserveOptions(probe=True, probe_credentials="insecure", registry=registry)
        )
    probe = observed.observer.probe
    assert isinstance(probe, PodProbe)
    probe.timeout_s = probe_timeout_s
    probe.maybe_probe(now=probe.interval_s)
    assert black_hole.connected.wait(10)  # the round is in flight, waiting on the black hole
    observed.close()
    probe.join(10)  # a third of the health check's own deadline
    assert probe.rounds == 1 and probe.stopped
    probe.maybe_probe(now=1e9)  # and no round starts again
    assert probe.rounds == 1 and "stopped" in repr(probe)


def test_a_probe_passed_in_is_the_callers_to_stop(black_hole: BlackHole) -> None:
    registry = AffinityRegistry()
    probe = PodProbe(black_hole.target, registry.detector(black_hole.target))
    observe(
        grpc.insecure_channel(black_hole.target),
        ObserveOptions(probe=probe, registry=registry),
        target=black_hole.target,
    ).close()
    assert not probe.stopped
    probe.stop()
    assert probe.stopped


def test_a_health_check_is_not_waited_for_past_its_deadline_and_a_grace(
    black_hole: BlackHole,
) -> None:
    """A lane's check carries its own deadline, but the maintenance thread (and ``close()``,
    which joins it) must not hang on a call that outlives it: past the wait it is cancelled
    and counts as a pod not reached. Here the call's deadline (30 s) is longer than the wait."""
    with grpc.insecure_channel(black_hole.target) as channel:
        future = check_method(channel).future("", timeout=30)
        assert black_hole.connected.wait(10)
        assert check_result(future, timeout=0.2) == CheckResult(False, None, False)
        assert future.cancelled()


def test_an_aio_health_check_is_not_waited_for_past_its_deadline_and_a_grace(
    black_hole: BlackHole, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wait is the check's deadline plus the grace: a grace below zero makes it shorter
    # than the deadline, as a deadline that never fires would.
    monkeypatch.setattr(aio_channel_module, "CHECK_GRACE_S", -29.8)
    target = black_hole.target

    async def main() -> tuple[CheckResult, list[Any]]:
        channel = AioBalancedChannel(
            aio_channel_factory(target), target, check_timeout_s=30, tick_s=60
        )
        try:
            lane = next(lane for lane in channel.pool.lanes if lane.connection is not None)
            started: list[Any] = []
            check = lane.connection.check

            def spied(*args: Any, **kwargs: Any) -> Any:
                started.append(check(*args, **kwargs))
                return started[-1]

            lane.connection.check = spied
            return await channel._check(lane), started
        finally:
            await channel.close()

    result, started = asyncio.run(main())
    assert result == CheckResult(False, None, False)
    # (the maintenance task's own first round may have checked the lane through the spy too)
    assert started and all(call.cancelled() for call in started)
