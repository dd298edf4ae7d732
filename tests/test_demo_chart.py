"""The demo's chart draws every pod of each act, a pod that served no call as a line at 0 (in
act 1 those idle pods are the point): from the real demo's figure, and from the pure step that
turns an act's calls into the lines drawn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpc_balance_mw.cli.chart import Timeline, chart_series

#: Runs the demo with matplotlib's ``Figure.savefig`` wrapped to write down what each panel
#: drew (title, and each labelled line's label and y values) before it saves the PNG.
DRAWN = """
import json, sys
import matplotlib
matplotlib.use("Agg")
from matplotlib.figure import Figure
from grpc_balance_mw.cli import main

drawn = []
save = Figure.savefig

def savefig(self, *args, **kwargs):
    for axis in self.axes:
        lines = [
            [line.get_label(), [float(y) for y in line.get_ydata()]]
            for line in axis.get_lines()
            if not line.get_label().startswith("_")
        ]
        drawn.append({"title": axis.get_title(loc="left"), "lines": lines})
    return save(self, *args, **kwargs)

Figure.savefig = savefig
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as file:
    json.dump(drawn, file)
sys.exit(code)
"""


@pytest.mark.cluster
@pytest.mark.slow  # runs the real demo: pods, a Service, about 15 s
def test_the_demo_chart_draws_every_pod_of_every_act(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    drawn_path, chart = tmp_path / "drawn.json", tmp_path / "demo.png"
    demo = ["demo", "--json", "--calls", "300", "--rate", "300", "--chart", str(chart)]
    done = subprocess.run(
        [sys.executable, "-c", DRAWN, str(drawn_path), *demo],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    acts = json.loads(done.stdout)["scenarios"]
    panels = json.loads(drawn_path.read_text())
    assert len(panels) == len(acts) == 4
    for act, panel in zip(acts, panels, strict=True):
        lines = {label.split(":")[0]: ys for label, ys in panel["lines"]}
        assert set(act["per_pod"]) <= set(lines), (panel["title"], sorted(lines))
    # Act 1: one pod served all 300 calls; the two idle pods are drawn, flat at 0.
    pinned = {label.split(":")[0]: ys for label, ys in panels[0]["lines"]}
    idle = [pod for pod, calls in acts[0]["per_pod"].items() if calls == 0]
    assert len(idle) == 2
    for pod in idle:
        assert pinned[pod] and max(pinned[pod]) == 0, pod
    busy = max(acts[0]["per_pod"], key=acts[0]["per_pod"].__getitem__)
    assert max(pinned[busy]) == 300


# -- pure: the lines each panel draws ---------------------------------------------------------


def test_an_idle_pod_is_a_line_at_0_to_the_end_of_its_act() -> None:
    timeline = Timeline("pinned", [(0.1 * i, "pod-b") for i in range(1, 6)], [(0.7, "pinned")])
    timeline.pods = ["pod-a", "pod-b", "pod-c"]
    (panel,) = chart_series([timeline])
    lines = {line.pod: line for line in panel}
    assert sorted(lines) == ["pod-a", "pod-b", "pod-c"]
    for idle in ("pod-a", "pod-c"):
        assert (lines[idle].times, lines[idle].counts) == ([0.0, 0.7], [0, 0])
        assert lines[idle].label == f"{idle}: 0 calls"
    assert lines["pod-b"].counts == [0, 1, 2, 3, 4, 5, 5]  # flat from its last call to the mark
    assert lines["pod-b"].times[-1] == 0.7 and lines["pod-b"].label == "pod-b: 5 calls"


def test_a_pod_keeps_its_colour_across_panels_and_failures_are_their_own_line() -> None:
    pinned = Timeline("1", [(0.1, "pod-b")], pods=["pod-a", "pod-b"])
    spread = Timeline("2", [(0.1, "pod-a"), (0.2, "pod-b"), (0.3, None)], pods=["pod-a", "pod-b"])
    scaled = Timeline("3", [(0.1, "pod-c")], pods=["pod-a", "pod-b", "pod-c"])
    panels = chart_series([pinned, spread, scaled])
    colours = [{line.pod: line.color for line in panel} for panel in panels]
    assert colours[0]["pod-a"] == colours[1]["pod-a"] == colours[2]["pod-a"]
    assert colours[0]["pod-b"] == colours[1]["pod-b"] != colours[2]["pod-c"]
    assert [line.pod for line in panels[1]] == ["failed", "pod-a", "pod-b"]
    assert [line.failed for line in panels[1]] == [True, False, False]
    assert [len(panel) for panel in panels] == [2, 3, 3]
