"""The README's main command: the demo runs on the local cluster, tells its four acts in the
benchmark's document, and draws the chart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpc_balance_mw.cli.chart import CHART_HINT, Timeline, write_chart

PNG = b"\x89PNG\r\n\x1a\n"


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "grpc_balance_mw.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.cluster
def test_the_demo_document_tells_pinning_the_surge_and_the_fix(tmp_path: Path) -> None:
    chart = tmp_path / "demo.png"
    done = demo("--json", "--calls", "450", "--rate", "300", "--chart", str(chart))
    assert done.returncode == 0, done.stderr
    acts = json.loads(done.stdout)["scenarios"]
    assert [(a["name"], a["strategy"]) for a in acts] == [
        ("pinned", "interceptors"),
        ("surge", "plain"),
        ("surge", "balanced"),
        ("scale-up", "balanced"),
    ]
    pinned, surge_plain, surge_balanced, scale_up = acts
    # Act 1: every call on one pod, by the pods' own counts; the observer raised the alarm.
    assert sorted(pinned["per_pod"].values()) == [0, 0, 450]
    assert pinned["max_share_over_fair"] == 3.0 and pinned["alarm"] == "pinned"
    # The surge counts its own calls only (no hidden warm-up call).
    for surge in (surge_plain, surge_balanced):
        assert surge["calls"] == 48 and sum(surge["per_pod"].values()) == 48, surge
    assert surge_plain["max_share_over_fair"] == 3.0
    assert surge_balanced["max_share_over_fair"] <= 1.25
    assert min(surge_balanced["per_pod"].values()) > 0
    # Act 4: both new pods get traffic (the counts are those after the scale-up).
    assert scale_up["seconds_to_new_pod_traffic"] is not None
    assert len(scale_up["per_pod"]) == 5
    assert scale_up["per_pod"]["charge-points-3"] > 0, scale_up
    assert scale_up["per_pod"]["charge-points-4"] > 0, scale_up
    assert chart.read_bytes().startswith(PNG)
    assert f"chart: calls per pod over time, one panel per act: {chart}" in done.stderr


@pytest.mark.cluster
def test_the_demo_tables_show_the_alarm_in_its_act_with_a_real_span(tmp_path: Path) -> None:
    done = demo("--calls", "450", "--surge", "24", "--chart", str(tmp_path / "c.png"))
    assert done.returncode == 0, done.stderr
    acts = done.stdout.split("\n== ")
    assert len(acts) == 5
    pinned = acts[1]
    assert "detector: pinned" in pinned and " 450  " in pinned
    assert "unverified -> pinned" in pinned and "WARNING grpc_balance_mw: calls to" in pinned
    assert '"grpc_balance_mw.pod": "charge-points-' in pinned  # the span, as the SDK prints it
    assert '"name": "grpc_balance_mw.affinity.state_change"' in pinned
    assert "are pinned" not in done.stderr  # the warning is in its section, not on stderr
    assert "act 4/4" in done.stderr and "act 4/4" not in done.stdout
    scale_up = acts[4]
    for pod in ("charge-points-3", "charge-points-4"):
        assert f"{pod} served its first call" in scale_up, scale_up


def test_without_matplotlib_one_line_says_how_to_get_the_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on an install without the extra
    path = tmp_path / "chart.png"
    why = write_chart([Timeline("act", [(0.1, "pod-a")])], path)
    assert why is not None and CHART_HINT in why and str(path) in why
    assert not path.exists()


@pytest.mark.slow
def test_the_chart_has_a_panel_per_act(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    timelines = [
        Timeline("pinned", [(0.01 * i, "pod-a") for i in range(50)], [(0.2, "pinned")]),
        Timeline("spread", [(0.01 * i, f"pod-{i % 3}") for i in range(50)] + [(0.6, None)]),
    ]
    assert timelines[1].cumulative()["failed"] == ([0.0, 0.6], [0, 1])
    path = tmp_path / "chart.png"
    assert write_chart(timelines, path) is None
    assert path.read_bytes().startswith(PNG)
