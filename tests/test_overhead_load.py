"""The many-callers part of ``grpc-balance overhead``: it measures every variant, its verdicts
read the figures right, and the detector bench runs (no timing is asserted)."""

from __future__ import annotations

from conftest import SyncPod

from grpc_balance_mw.cli import overhead_load


def test_many_callers_measure_every_variant_on_a_real_pod(sync_pod: SyncPod) -> None:
    threads = overhead_load.measure_threads(sync_pod.target, rounds=1, threads=2, calls_each=3)
    tasks = overhead_load.measure_tasks(sync_pod.target, rounds=1, tasks=3, calls_each=2)
    interleaved = overhead_load.measure_threads_interleaved(
        sync_pod.target, rounds=1, threads=2, iterations=2
    )
    for figures in (threads, tasks, interleaved):
        assert list(figures) == list(overhead_load.VARIANTS)
        assert all(
            len(rows) == 1 and rows[0][0] >= 0 and rows[0][1] > 0 for rows in figures.values()
        )


def test_the_verdicts_read_client_cpu_against_bare_and_otel() -> None:
    figures = {
        "bare": [(100.0, 300.0)],
        "detection": [(102.0, 301.0)],
        "detection+spans+metrics": [(160.0, 320.0)],
        "otel-grpc": [(150.0, 330.0)],
    }
    text = overhead_load.report("title", figures)
    assert "detection vs bare: +2.0% client CPU (target <= 3%) met" in text
    assert (
        "detection+spans+metrics vs otel-grpc: 1.067x client CPU (target <= 1.00x) MISSED" in text
    )


def test_the_detector_bench_runs() -> None:
    costs = overhead_load.detector_costs((3, 30), calls=500, chunk=100)
    assert set(costs) == {3, 30} and all(cost > 0 for cost in costs.values())


def test_the_report_shows_the_comparison_round_by_round() -> None:
    figures = {
        "bare": [(100.0, 300.0), (200.0, 300.0)],
        "detection": [(101.0, 300.0), (210.0, 300.0)],
        "detection+spans+metrics": [(150.0, 300.0), (300.0, 300.0)],
        "otel-grpc": [(150.0, 300.0), (250.0, 300.0)],
    }
    text = overhead_load.report("title", figures)
    assert "per round +1.0%..+5.0%" in text
    assert "per round 1.000x..1.200x" in text


def test_the_report_gives_the_noise_floor_and_judges_on_paired_rounds() -> None:
    figures = {
        "bare": [(100.0, 300.0), (200.0, 300.0), (100.0, 300.0)],
        "bare-again": [(101.0, 300.0), (196.0, 300.0), (100.0, 300.0)],
        # the overall medians say +5.0 %; round by round it is +1 %, +2 %, +50 %
        "detection": [(101.0, 300.0), (204.0, 300.0), (150.0, 300.0)],
        "detection+spans+metrics": [(150.0, 300.0)] * 3,
        "otel-grpc": [(150.0, 300.0)] * 3,
    }
    text = overhead_load.report("title", figures)
    assert "detection vs bare: +2.0% client CPU (target <= 3%) met" in text
    assert (
        "noise floor, bare-again vs bare (the same channel): +0.0%; per round -2.0%..+1.0%" in text
    )


def test_own_work_times_observe_apart_from_any_call(sync_pod: SyncPod) -> None:
    """Detection's own work is measured on a channel whose calls end at once: it is positive
    (observe() does work the bare channel does not), and the report sets it against a real
    warm call's client CPU, for one caller and for many."""
    assert overhead_load.own_work(calls=2000, repeats=1) > 0
    assert overhead_load.own_work(threads=4, calls=2000, repeats=1) > 0
    text = overhead_load.own_work_report(sync_pod.target, threads=4, threads_call_cpu=200.0)
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("detection's own work, one caller: ")
    assert lines[1].startswith("detection's own work, 4 threads: ")
    assert all("a warm call costs this client" in line for line in lines)
