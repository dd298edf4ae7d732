"""The demo's picture: calls per pod over time (running counts), one panel per act.

matplotlib is optional (the ``chart`` extra); without it the demo says how to get the chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHART_HINT", "Series", "Timeline", "chart_series", "write_chart"]

CHART_HINT = "pip install 'grpc_balance_mw[chart]'"
#: The series of the calls that failed (no pod served them).
FAILED = "failed"


@dataclass
class Timeline:
    """One act: when each call ended and which pod served it (None: it failed), and every pod
    the act had, so that a pod that served nothing is drawn too (it is the point of act 1)."""

    title: str
    calls: list[tuple[float, str | None]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)

    @property
    def end(self) -> float:
        """When the act's last call ended (or its last mark, if later)."""
        return max([0.0, *(at for at, _ in self.calls), *(at for at, _ in self.marks)])

    def cumulative(self) -> dict[str, tuple[list[float], list[int]]]:
        """Per pod, every one of ``pods`` included (failed calls under ``failed``): when each
        call ended and the running count, from 0 at the start to the act's end."""
        series: dict[str, tuple[list[float], list[int]]] = {pod: ([0.0], [0]) for pod in self.pods}
        for at, pod in sorted(self.calls, key=lambda call: call[0]):
            times, counts = series.setdefault(pod or FAILED, ([0.0], [0]))
            times.append(at)
            counts.append(counts[-1] + 1)
        end = self.end
        for times, counts in series.values():
            if times[-1] < end:  # the line goes on, flat, to the end of the act
                times.append(end)
                counts.append(counts[-1])
        return dict(sorted(series.items()))


@dataclass(frozen=True)
class Series:
    """One line of a panel, as drawn: its label, colour and step points."""

    pod: str
    label: str
    color: str
    times: list[float]
    counts: list[int]

    @property
    def failed(self) -> bool:
        return self.pod == FAILED


def chart_series(timelines: Sequence[Timeline]) -> list[list[Series]]:
    """What each panel draws (pure): a line per pod of the act, idle ones flat at 0, then the
    failed calls; a pod keeps its colour from panel to panel, and its label gives its count."""
    pods = sorted({pod for t in timelines for pod in t.cumulative() if pod != FAILED})
    colors = {pod: f"C{index % 10}" for index, pod in enumerate(pods)}
    panels: list[list[Series]] = []
    for timeline in timelines:
        panel = []
        for pod, (times, counts) in timeline.cumulative().items():
            label = f"{pod}: {counts[-1]} calls"
            panel.append(Series(pod, label, colors.get(pod, "black"), times, counts))
        panels.append(panel)
    return panels


def write_chart(timelines: Sequence[Timeline], path: Path) -> str | None:
    """Write the PNG; returns why it could not be written (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no chart: matplotlib is not installed ({CHART_HINT} draws {path})"
    figure, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.6 * len(timelines)), squeeze=False)
    for axis, timeline, panel in zip(axes[:, 0], timelines, chart_series(timelines), strict=True):
        for line in panel:
            style: dict[str, Any] = {"color": line.color}
            if line.failed:
                style.update(color="black", linestyle=":")
            elif line.counts[-1] == 0:
                style.update(linewidth=3, alpha=0.6)  # idle pods share y=0: thicker, see-through
            axis.step(line.times, line.counts, where="post", label=line.label, **style)
        for at, label in timeline.marks:
            axis.axvline(at, color="grey", linestyle="--", linewidth=0.8)
            axis.annotate(label, (at, 0), xytext=(3, 3), textcoords="offset points", fontsize=8)
        axis.set_title(timeline.title, fontsize=10, loc="left")
        axis.set_ylabel("calls so far")
        axis.legend(fontsize=7, loc="upper left", ncol=3)
    axes[-1, 0].set_xlabel("seconds into the act (a call counts when it ends)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
