"""The demo's picture: calls per pod over time (running counts), one panel per act.

matplotlib is optional (the ``chart`` extra); without it the demo says how to get the chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHART_HINT", "Timeline", "write_chart"]

CHART_HINT = "pip install 'grpc_balance_mw[chart]'"


@dataclass
class Timeline:
    """When each call of one act ended, and which pod served it (None: it failed)."""

    title: str
    calls: list[tuple[float, str | None]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)

    def cumulative(self) -> dict[str, tuple[list[float], list[int]]]:
        """Per pod (failed calls under ``failed``): when each call ended, and the running count."""
        series: dict[str, tuple[list[float], list[int]]] = {}
        for at, pod in sorted(self.calls, key=lambda call: call[0]):
            times, counts = series.setdefault(pod or "failed", ([0.0], [0]))
            times.append(at)
            counts.append(counts[-1] + 1)
        return dict(sorted(series.items()))


def write_chart(timelines: Sequence[Timeline], path: Path) -> str | None:
    """Write the PNG; returns why it could not be written (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return f"no chart: matplotlib is not installed ({CHART_HINT} draws {path})"
    figure, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.6 * len(timelines)), squeeze=False)
    for axis, timeline in zip(axes[:, 0], timelines, strict=True):
        for pod, (times, counts) in timeline.cumulative().items():
            style = {"color": "black", "linestyle": ":"} if pod == "failed" else {}
            axis.step(times, counts, where="post", label=pod, **style)
        for at, label in timeline.marks:
            axis.axvline(at, color="grey", linestyle="--", linewidth=0.8)
            axis.annotate(label, (at, 0), xytext=(3, 3), textcoords="offset points", fontsize=8)
        axis.set_title(timeline.title, fontsize=10, loc="left")
        axis.set_ylabel("calls so far")
        axis.legend(fontsize=7, loc="upper right", ncol=3)
    axes[-1, 0].set_xlabel("seconds into the act (a call counts when it ends)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
