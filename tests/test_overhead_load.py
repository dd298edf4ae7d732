"""The many-callers part of ``grpc-balance overhead``: it measures every variant, its verdicts
read the figures right, and the detector bench runs (no timing is asserted)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import SyncPod

from grpc_balance_mw.affinity import AffinityRegistry, AffinityState
from grpc_balance_mw.aio import observe as observe_aio
from grpc_balance_mw.cli import overhead, overhead_load
from grpc_balance_mw.observing import ObserveOptions


@pytest.mark.slow
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


@pytest.mark.slow
def test_own_work_times_observe_apart_from_any_call(sync_pod: SyncPod) -> None:
    """Detection's own work is measured on a channel whose calls end at once: it is positive
    (observe() does work the bare channel does not), and the report sets it against a real
    warm call's client CPU, for one caller and for many."""
    assert overhead_load.own_work(calls=2000, repeats=1) > 0
    assert overhead_load.own_work(threads=4, calls=2000, repeats=1) > 0
    assert overhead_load.own_work_aio(calls=2000, repeats=1) > 0
    text = overhead_load.own_work_report(
        sync_pod.target, threads=4, threads_call_cpu=200.0, tasks=50, tasks_call_cpu=150.0
    )
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("detection's own work, one caller: ")
    assert lines[1].startswith("detection's own work, 4 threads: ")
    assert lines[2].startswith("detection's own work, one aio task: ")
    assert lines[3].startswith("detection's own work, 50 aio tasks: ")
    assert "through aio observe()" in lines[2] and "costs this client 150 us" in lines[3]
    assert all("a warm call costs this client" in line for line in lines)


def test_the_aio_channel_whose_calls_end_at_once_is_observed_as_a_real_one() -> None:
    """What the aio own-work figure times is detection's real path: each call is grpcio's own
    aio call object, awaited without suspending, and the detector counts every one of them
    with the pod's headers (a fake that observe() did not read would time nothing)."""

    async def main() -> tuple[Any, list[Any]]:
        raw = overhead_load._AioAnsweringChannel(asyncio.get_running_loop())
        options = ObserveOptions(registry=AffinityRegistry(overhead_load.STEADY), expected_pods=3)
        observed = observe_aio(raw, options, target="10.0.0.7:50051")
        rpc = observed.unary_unary("/bench.B/C")
        replies = [await rpc(overhead_load._REQUEST, timeout=10) for _ in range(40)]
        snapshot = observed.detector.snapshot()
        await observed.close()
        return snapshot, replies

    snapshot, replies = asyncio.run(main())
    assert replies == [overhead_load._REQUEST] * 40
    assert snapshot.calls == 40 and list(snapshot.pods) == ["bench-pod-0"]
    assert snapshot.state is AffinityState.PINNED


def test_the_single_caller_verdicts_judge_each_way_on_what_it_adds() -> None:
    """Two rounds of two calls per variant: every verdict is the median of per-round ratios of
    medians; the interceptor's lines against bare name what grpcio's machinery costs alone, and
    its spans are set against otel-grpc by what each adds to the channel it works on."""
    medians = {
        "bare": (100.0, 200.0),
        "bare-again": (101.0, 200.0),
        "noop-interceptor": (104.0, 208.0),
        "detection": (106.0, 214.0),
        "detection-channel": (101.0, 202.0),
        "detection+spans": (123.0, 250.0),
        "detection+spans-channel": (117.0, 236.0),
        "otel-grpc": (120.0, 240.0),
    }
    samples = {name: [a, a, b, b] for name, (a, b) in medians.items()}
    lines = overhead.verdicts(samples, calls=2)
    assert lines[0] == (
        "detection vs bare: +6.5% (target <= 3%) MISSED; per round +6.0%..+7.0% "
        "(grpcio's intercept_channel alone: +4.0% of bare)"
    )
    assert lines[1].startswith("detection vs noop-interceptor: +2.4% (target <= 3%) met")
    assert lines[2].startswith("detection-channel vs bare: +1.0% (target <= 3%) met;")
    assert lines[3].startswith("detection+spans vs otel-grpc: 1.033x (target <= 1.00x) MISSED")
    assert lines[4].startswith("detection+spans-channel vs otel-grpc: 0.979x (target <= 1.00x) met")
    # (123/104) / (120/100) = 0.986 and (250/208) / (240/200) = 1.002: median 0.994
    assert lines[5].startswith(
        "detection+spans over noop-interceptor vs otel-grpc over bare: 0.994x (target <= 1.00x) met"
    )
    assert lines[6].startswith("noise floor, bare-again vs bare (the same channel): +0.5%")
