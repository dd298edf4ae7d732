"""Write docs/benchmarks.md from ``grpc-balance bench --json`` documents, so that the figures in
the docs are the bench's own and cannot drift from it.

    grpc-balance bench --scenario all --json > run1.json      # as many runs as you like
    python scripts/benchmarks_doc.py run1.json run2.json ... > docs/benchmarks.md

With several runs, each cell is the median over the runs and the spread (lowest..highest) follows
it in brackets. A document of another ``schema`` than this script knows is refused.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1

Entry = dict[str, Any]
#: Column title, how to read a number from one entry (None: not measured there), its decimals.
Column = tuple[str, Callable[[Entry], float | None], int]


def _failed_of(entry: Entry) -> float | None:
    return float(entry["errors"]) if entry.get("calls") else None


#: Per scenario: its heading, what one row says, and its columns.
TABLES: dict[str, tuple[str, list[Column]]] = {
    "steady": (
        "Steady: warm unary calls back to back, interleaved, 3 pods",
        [
            ("max share / fair", lambda e: e["max_share_over_fair"], 2),
            ("p50 ms", lambda e: e["p50_ms"], 2),
            ("p99 ms", lambda e: e["p99_ms"], 2),
            ("failed", _failed_of, 0),
        ],
    ),
    "scale-up": (
        "Scale-up: 3 -> 5 pods while calling at 50 calls/s",
        [
            ("s to a new pod's first call", lambda e: e.get("seconds_to_new_pod_traffic"), 2),
            ("max share / fair after", lambda e: e["max_share_over_fair"], 2),
            ("failed", _failed_of, 0),
        ],
    ),
    "surge": (
        "Surge: waves of concurrent calls with a 250 ms deadline, pods of limited capacity",
        [
            ("p50 ms", lambda e: e["p50_ms"], 2),
            ("p99 ms", lambda e: e["p99_ms"], 2),
            ("failed", _failed_of, 0),
        ],
    ),
    "pod-kill": (
        "Pod kill: a pod SIGKILLed under load (retrying strategies retry GetChargePoint)",
        [("calls", lambda e: e["calls"], 0), ("failed", _failed_of, 0)],
    ),
    "streaming": (
        "Streaming: long and short streams while the cluster goes 3 -> 5 -> 3",
        [
            ("streams", lambda e: e["calls"], 0),
            ("cut", _failed_of, 0),
            ("first message p50 ms", lambda e: e["p50_ms"], 2),
        ],
    ),
    "client-ip": (
        "ClientIP: iptables Service with sessionAffinity ClientIP, default options, 50 calls/s",
        [
            ("s to ClientIP named", lambda e: e.get("named_after_s"), 2),
            ("connections dialled", lambda e: e.get("connections_dialled"), 0),
            ("s to the last dial", lambda e: e.get("last_dial_s"), 1),
            ("max share / fair", lambda e: e["max_share_over_fair"], 2),
        ],
    ),
    "unidentified": (
        "Unidentified: pods that stamp no identity, default options, 50 calls/s",
        [
            ("call of the warning", lambda e: e.get("unidentified_call"), 0),
            ("max share / fair, any long window", lambda e: e.get("max_long_window_share"), 2),
            ("connections dialled", lambda e: e.get("connections_dialled"), 0),
        ],
    ),
    "defaults": (
        "Defaults: no options at all, 300 back-to-back calls",
        [
            ("call of the alarm", lambda e: e.get("alarm_call"), 0),
            ("call Rebalance moved at", lambda e: e.get("rebalanced_call"), 0),
            ("max share / fair", lambda e: e["max_share_over_fair"], 2),
        ],
    ),
}


def _row(entry: Entry) -> str:
    """A table row's name: the strategy, and its variant if it has one."""
    variant = entry.get("variant")
    return f"{entry['strategy']} ({variant})" if variant else str(entry["strategy"])


def load(paths: Sequence[str]) -> list[dict[str, Any]]:
    documents = []
    for path in paths:
        document = json.loads(Path(path).read_text())
        if document.get("schema") != SCHEMA:
            raise SystemExit(
                f"{path}: schema {document.get('schema')!r}, this script reads {SCHEMA}"
            )
        documents.append(document)
    if not documents:
        raise SystemExit("give one or more files written by `grpc-balance bench --json`")
    return documents


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    middle = statistics.median(values)
    text = f"{middle:.{digits}f}"
    if len(values) > 1 and min(values) != max(values):
        text += f" ({min(values):.{digits}f}..{max(values):.{digits}f})"
    return text


def render(documents: Sequence[dict[str, Any]]) -> str:
    machines = {json.dumps(d["machine"], sort_keys=True) for d in documents}
    settings = {json.dumps(d["settings"], sort_keys=True) for d in documents}
    lines = [
        "# Benchmarks",
        "",
        f"Generated from {len(documents)} run(s) of `grpc-balance bench --json` (docs/bench/) by",
        "`python scripts/benchmarks_doc.py docs/bench/*.json > docs/benchmarks.md`; do not edit by",
        "hand. Each cell is the median over the runs, with the lowest..highest in brackets where",
        "they differ. Spreads come from the pods' own counts; latencies come from one shared",
        "2-core machine (its load is in the machine line), so read them as ratios between",
        "strategies of the same run, not as absolute figures.",
        "",
    ]
    for machine in sorted(machines):
        lines.append(f"Machine: `{machine}`")
    for setting in sorted(settings):
        lines.append(f"Settings: `{setting}`")
    for scenario, (heading, columns) in TABLES.items():
        rows: dict[str, list[Entry]] = {}
        for document in documents:
            for entry in document["scenarios"]:
                if entry["name"] == scenario and not str(entry.get("note", "")).startswith(
                    "left out"
                ):
                    rows.setdefault(_row(entry), []).append(entry)
        if not rows:
            continue
        lines += ["", f"## {heading}", ""]
        lines.append("| strategy | " + " | ".join(column[0] for column in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for strategy, entries in rows.items():
            cells = []
            for _title, read, digits in columns:
                values = [float(v) for v in (read(e) for e in entries) if v is not None]
                cells.append(_cell(values, digits))
            lines.append(f"| `{strategy}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    sys.stdout.write(render(load(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
