"""``grpc-balance overhead --balanced``: the balanced channel's client CPU per call against
grpcio's native round_robin and a plain channel. The quick mode is run as a user runs it; what is
checked is the output's structure and that every variant made its calls (no timed assertion)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from grpc_balance_mw.cli import overhead_balanced as balanced

COMMAND = [sys.executable, "-m", "grpc_balance_mw.cli", "overhead", "--balanced", "--quick"]


def _workloads(settings: balanced.Settings) -> dict[str, tuple[str, int]]:
    """Each workload's name, unit, and how many units each variant makes in it."""
    rounds = settings.rounds
    return {
        "one caller": ("call", rounds * settings.calls),
        f"{settings.threads} threads": ("call", rounds * settings.threads * settings.thread_calls),
        f"{settings.tasks} aio tasks": ("call", rounds * settings.tasks * settings.task_calls),
        "server streaming": ("message", rounds * settings.streams * settings.messages),
    }


@pytest.mark.slow
def test_quick_json_has_every_workload_variant_ratio_and_idle_kind() -> None:
    done = subprocess.run(
        [*COMMAND, "--json"], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    settings = balanced.Settings.quick()
    assert document["rounds"] == settings.rounds
    assert document["pods"] == 3
    expected = _workloads(settings)
    assert list(document["workloads"]) == list(expected)
    for name, (unit, units) in expected.items():
        workload = document["workloads"][name]
        assert workload["unit"] == unit
        assert list(workload["variants"]) == list(balanced.VARIANTS)
        for figures in workload["variants"].values():
            assert figures["units"] == units  # every variant made every one of its calls
            assert len(figures["rounds"]) == settings.rounds
            assert all(value > 0 for value in figures["rounds"])
        assert list(workload["ratios"]) == [f"{v}/{b}" for v, b in balanced.COMPARISONS]
        for ratio in workload["ratios"].values():
            assert len(ratio["rounds"]) == settings.rounds
            assert ratio["q1"] <= ratio["median"] <= ratio["q3"]
        timed = name in ("one caller", f"{settings.threads} threads")
        for figures in workload["variants"].values():
            assert (figures["p99_us"] is not None) is timed
    assert list(document["idle"]) == [kind for kind in balanced.IDLE_KINDS if kind != "nothing"]
    for idle in document["idle"].values():
        assert len(idle["rounds"]) == settings.idle_rounds
        assert math.isfinite(idle["ms_per_s_per_channel"])
    assert "sync workloads, round 1/2" in done.stderr  # progress on stderr, results on stdout


def test_report_shows_each_ratio_with_its_quartiles_and_the_idle_lines() -> None:
    settings = balanced.Settings.quick()
    workload = balanced.Workload("one caller", "call")
    for round_cpu in (1.0, 2.0):
        for index, variant in enumerate(balanced.VARIANTS):
            workload.add(variant, round_cpu * (1 + index / 10) / 1e6, 1, [10.0, 20.0])
    results = balanced.Results(
        [workload], {"balanced": [3.0], "plain": [0.5]}, settings, "haproxy", "0.1 0.2 0.3"
    )
    text = balanced.report(results)
    # balanced is VARIANTS[3], native-rr VARIANTS[2]: 1.3 / 1.2 in each round.
    assert f"{1.3 / 1.2:.3f} [{1.3 / 1.2:.2f}-{1.3 / 1.2:.2f}]" in text
    assert "plain-again/plain" in text
    assert "loadavg 0.1 0.2 0.3" in text
    assert "balanced          3.00 ms/s" in text
