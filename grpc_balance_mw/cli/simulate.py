"""``grpc-balance simulate``: a fleet of clients and pods, simulated (see
:mod:`grpc_balance_mw.simulate`), one run or the medians of several seeds."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.simulate import FleetConfig, FleetResult, simulate
from grpc_balance_mw.subset import SubsetRule

__all__ = ["run", "summarize"]

#: The figures a median is taken of over runs, and the human table's columns (key, heading).
_COLUMNS = (
    ("max_share_over_fair", "max/fair"),
    ("min_share_over_fair", "min/fair"),
    ("connections_per_pod_max_over_mean", "conns max/mean"),
    ("connections_per_pod_mean_max_over_mean", "(mean)"),
    ("lanes_per_client_max", "lanes max"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("redials", "redials"),
    ("leaves", "leaves"),
    ("moves", "moves"),
)


def summarize(results: Sequence[FleetResult]) -> dict[str, Any]:
    """One document: the first run's settings, each figure's median over the runs, and with
    several runs their spread (min, max) and each run's figures."""
    first = results[0].summary()
    document: dict[str, Any] = {
        key: first[key]
        for key in ("clients", "pods", "lanes", "seconds", "seed", "rebalance_subset", "picker")
    }
    for key, _ in _COLUMNS:
        values = [getattr(result, key) for result in results]
        document[key] = statistics.median(values)
    document["calls"] = sum(result.calls for result in results)
    document["served"] = sum(result.served for result in results)
    document["utilization"] = statistics.median(result.utilization for result in results)
    document["runs"] = len(results)
    if len(results) > 1:
        document["spread"] = {
            key: [min(getattr(r, key) for r in results), max(getattr(r, key) for r in results)]
            for key, _ in _COLUMNS
        }
        document["per_run"] = [result.summary() for result in results]
    return document


def _table(results: Sequence[FleetResult], document: dict[str, Any]) -> str:
    rows = [["seed", *(heading for _, heading in _COLUMNS)]]
    for result in results:
        rows.append([str(result.seed), *(f"{getattr(result, key):g}" for key, _ in _COLUMNS)])
    if len(results) > 1:
        rows.append(["median", *(f"{document[key]:g}" for key, _ in _COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    rule = "subset rule on" if document["rebalance_subset"] else "random picks only"
    head = (
        f"{document['clients']} clients x {document['pods']} pods x {document['lanes']} lanes, "
        f"{document['seconds']:g} s simulated, {rule}, picker {document['picker']}, "
        f"utilization {document['utilization']:g}"
    )
    return "\n".join([head, *lines])


def run(args: argparse.Namespace) -> int:
    results = []
    for offset in range(args.runs):
        config = FleetConfig(
            clients=args.clients,
            pods=args.pods,
            lanes=min(args.lanes, args.pods),
            seconds=args.seconds,
            seed=args.seed + offset,
            rate=args.rate,
            load=args.load,
            concurrency=args.concurrency,
            service_s=args.service_ms / 1000,
            rotate_s=args.rotate_s or None,
            subset_rule=SubsetRule() if args.rebalance_subset else None,
            picker=args.picker,
        )
        if args.runs > 1:
            progress(f"simulate: run {offset + 1} of {args.runs} (seed {config.seed})")
        results.append(simulate(config))
    document = summarize(results)
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(_table(results, document))
    return 0
