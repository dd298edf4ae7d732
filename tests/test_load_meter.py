"""The load meter's figures, with fake clocks: utilization, rates, CPU, connections."""

from __future__ import annotations

import logging

import pytest

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.load_meter import LoadMeter
from grpc_balance_mw.orca import decode_load_report


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def meter(clock: Clock, cpu: Clock | None = None, **kwargs: object) -> LoadMeter:
    return LoadMeter(clock=clock, cpu_clock=cpu or Clock(0.0), cpus=2, **kwargs)  # type: ignore[arg-type]


def test_utilization_is_the_mean_in_flight_over_capacity() -> None:
    clock = Clock()
    load = meter(clock, capacity=4)
    clock.now += 10  # a meter older than its window
    load.start("a")
    load.start("a")
    clock.now += 2.0  # two calls in flight for the whole 2 s window
    report = load.end()
    assert report.application_utilization == pytest.approx(2 / 4)
    assert report.named_metrics["in_flight"] == 1


def test_a_pod_at_half_speed_reports_twice_the_utilization() -> None:
    def run(service_s: float) -> float:
        clock = Clock()
        load = meter(clock, capacity=4)
        ends: list[float] = []
        for n in range(400):  # 20 calls per second, each taking service_s
            now = 100.0 + n * 0.05
            while ends and ends[0] <= now:
                clock.now = ends.pop(0)
                report = load.end()
            clock.now = now
            load.start("a")
            ends.append(now + service_s)
        return report.application_utilization

    fast, slow = run(0.04), run(0.08)
    assert fast == pytest.approx(20 * 0.04 / 4, rel=0.1)
    assert slow == pytest.approx(2 * fast, rel=0.1)


def test_calls_held_past_the_window_count_only_inside_it() -> None:
    clock = Clock()
    load = meter(clock, capacity=2)
    load.start("a")
    clock.now += 60  # one call held a minute, no other event
    assert load.report().application_utilization == pytest.approx(1 / 2)


def test_rates_count_the_calls_that_ended_in_the_window() -> None:
    clock = Clock()
    load = meter(clock)
    clock.now += 10
    for n in range(20):
        load.start("a")
        clock.now += 0.05
        report = load.end(failed=n % 4 == 0)
    # 20 calls and 5 failures in the window, which spans 2 to 2.5 s (4 buckets of 0.5 s and
    # the one filling now).
    assert 20 / 2.5 - 1e-6 <= report.rps_fractional <= 20 / 2.0 + 1e-6
    assert report.eps == pytest.approx(report.rps_fractional / 4)
    clock.now += 5  # past the window: nothing ended in it
    assert load.report().rps_fractional == 0


def test_cpu_utilization_is_cached_over_its_window() -> None:
    clock, cpu = Clock(), Clock(0.0)
    load = meter(clock, cpu, cpu_window_s=1.0)
    clock.now += 2.0
    cpu.now += 1.0  # one CPU-second in 2 s, of 2 CPUs
    assert load.report().cpu_utilization == pytest.approx(0.25)
    cpu.now += 5.0
    clock.now += 0.5  # inside the window: the cached figure
    assert load.report().cpu_utilization == pytest.approx(0.25)
    assert load.report().application_utilization == 0  # no capacity: A58 weighs by the CPU


def test_connections_are_the_peers_seen_within_their_window() -> None:
    clock = Clock()
    load = meter(clock, peer_window_s=10.0)
    load.start("ipv4:10.0.0.1:1000")
    load.end()
    load.touch("ipv4:10.0.0.2:2000")  # a health check's connection counts from its third
    load.touch("ipv4:10.0.0.3:3000")  # checked once (a scout): not a connection kept
    load.touch("ipv4:10.0.0.2:2000")  # checked twice (a new name confirmed): not yet either
    load.touch("ipv4:10.0.0.4:4000")
    assert load.report().named_metrics["connections"] == 1
    load.touch("ipv4:10.0.0.2:2000")
    assert load.report().named_metrics["connections"] == 2
    load.start("ipv4:10.0.0.4:4000")  # a call counts at once, after any checks
    load.end()
    assert load.report().named_metrics["connections"] == 3
    clock.now += 8
    load.touch("ipv4:10.0.0.2:2000")
    clock.now += 5
    assert load.report().named_metrics["connections"] == 1
    # A scout's check long ago and two checks now: two within the window, not yet counted.
    load.touch("ipv4:10.0.0.5:5000")
    clock.now += 11
    load.report()  # pruned
    load.touch("ipv4:10.0.0.5:5000")
    load.touch("ipv4:10.0.0.5:5000")
    assert load.report().named_metrics["connections"] == 0


def test_the_application_figure_wins_and_a_failing_one_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    load = meter(clock, capacity=4)
    load.set_application_utilization(0.7)
    assert load.report().application_utilization == 0.7

    def broken() -> float:
        raise RuntimeError("no figure")

    load.set_application_utilization(broken)
    with caplog.at_level(logging.ERROR):
        assert load.report().application_utilization == 0
    assert "no figure" in caplog.text
    load.set_application_utilization(None)
    assert load.report().application_utilization == 0  # back to capacity: nothing in flight


def test_a_changing_capacity_is_read_at_each_report() -> None:
    clock = Clock()
    capacity = [4]
    load = meter(clock, capacity=lambda: capacity[0])
    clock.now += 10
    load.start("a")
    clock.now += 2
    assert load.report().application_utilization == pytest.approx(1 / 4)
    capacity[0] = 0  # unlimited now: no utilization from capacity
    assert load.report().application_utilization == 0


@pytest.mark.parametrize(
    "kwargs", [{"capacity": 0}, {"window_s": 0}, {"peer_window_s": -1}, {"cpu_window_s": 0}]
)
def test_bad_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        LoadMeter(**kwargs)  # type: ignore[arg-type]


def test_the_wire_form_decodes_to_the_report() -> None:
    clock, cpu = Clock(), Clock(0.0)
    load = meter(clock, cpu, capacity=3)
    clock.now += 3
    cpu.now += 0.5
    load.start("a")
    load.start("b")
    clock.now += 1
    load.end(failed=True)
    report = load.report()
    assert report.eps > 0 and report.cpu_utilization > 0 and report.application_utilization > 0
    assert decode_load_report(load.report_encoded()) == report
