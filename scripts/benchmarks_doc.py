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


def _ejected_of(entry: Entry) -> float | None:
    """Outlier ejections (None: a strategy without outlier detection)."""
    ejections = entry.get("ejections")
    return float(ejections["count"]) if ejections is not None else None


def _slow_share_of(entry: Entry) -> float | None:
    share = entry.get("slow_share_over_capacity_share")
    return float(share) if share is not None else None


#: How to read a table, printed under its heading (scenarios without one have none).
READING: dict[str, str] = {
    "gray-failure": "`pods ejected`: the balanced channel's outlier ejections (a pod that fails "
    "every call while its health says SERVING should be ejected, again each time it returns, and "
    "no other pod ever).",
    "slow-pod": "Each strategy has a cluster of its own and several client processes sending at "
    "a fixed rate (open loop). p50/p99 over every call, a failed one at its failure. The slow "
    "pod's share of the calls answered of those sent after the first 10 s, over its share of "
    "the capacity (0.2): 1.00 is right, an even spread gives 1.67 and its queue grows without "
    "bound (calls past their deadline answer nothing, so they lower the share instead).",
    "hung-pod": "Every strategy at once on one cluster; the pod the plain channel is on hangs "
    "(SIGSTOP) for the run and is SIGCONTed at the end. `s to the last failure`: from the hang "
    "to the last call that failed (its deadline, 1 s, included); a channel that stops sending to "
    "the hung pod stays near 1 s, one that keeps sending to it reaches the end of the run.",
    "fleet": "Each strategy has a cluster of its own; shares from the pod each response names, "
    "over the run and over each 5 s window (the last left out: it ends with the load). The pods "
    "cannot count their connections: `lanes per pod` counts the clients' lanes on each pod at "
    "the end (max over the mean of the 6 pods).",
}

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
    "gray-failure": (
        "Gray failure: steady with one pod answering UNAVAILABLE while its health says SERVING",
        [
            ("calls", lambda e: e["calls"], 0),
            ("failed", _failed_of, 0),
            ("pods ejected", _ejected_of, 0),
        ],
    ),
    "slow-pod": (
        "Slow pod: 3 pods of capacity 4, one at half speed, client processes at 80 % of capacity",
        [
            ("p50 ms", lambda e: e["p50_ms"], 2),
            ("p99 ms", lambda e: e["p99_ms"], 2),
            ("failed", _failed_of, 0),
            ("slow pod's share / its capacity share", _slow_share_of, 2),
            ("pods ejected", _ejected_of, 0),
        ],
    ),
    "hung-pod": (
        "Hung pod: the plain channel's pod SIGSTOPped under load, calls with a 1 s deadline",
        [
            ("calls", lambda e: e["calls"], 0),
            ("failed after the hang", lambda e: e.get("failed_after_hang"), 0),
            ("s to the last failure", lambda e: e.get("last_failure_after_hang_s"), 2),
            ("calls over 2 s", lambda e: e.get("slow_calls_after_hang"), 0),
            ("pods ejected", _ejected_of, 0),
        ],
    ),
    "fleet": (
        "Fleet: client processes x 6 pods, at most 4 lanes per balanced client, 60 % of capacity",
        [
            ("max share / fair", lambda e: e["max_share_over_fair"], 2),
            ("worst 5 s window", lambda e: e.get("max_window_share_over_fair"), 2),
            ("lanes per client, max", lambda e: e.get("lanes_per_client_max"), 0),
            ("lanes per pod max / mean", lambda e: e.get("connections_per_pod_max_over_mean"), 2),
            ("p99 ms", lambda e: e["p99_ms"], 2),
            ("failed", _failed_of, 0),
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
        if scenario in READING:
            lines += [READING[scenario], ""]
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
