"""``grpc-balance bench``, the command: runs the scenarios of :mod:`grpc_balance_mw.cli.bench`
and :mod:`grpc_balance_mw.cli.bench_membership` and prints a table or one JSON document.

A module of its own so that the membership scenarios, built on bench's parts, import bench and
are imported by the command without an import cycle.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from grpc_balance_mw.cli import (
    AIO_STRATEGIES,
    MEMBERSHIP_SCENARIOS,
    bench,
    bench_fleet,
    bench_membership,
)
from grpc_balance_mw.cli.arguments import progress
from grpc_balance_mw.cli.bench import SCENARIOS, Settings, document, print_table
from grpc_balance_mw.cli.strategies import Result
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.testing import missing_components

__all__ = ["run", "run_scenarios", "runner"]


def runner(name: str) -> Callable[[Settings], list[Result]]:
    """The scenario's function."""
    if name in bench.RUNNERS:
        return bench.RUNNERS[name]
    if name in bench_fleet.RUNNERS:
        return bench_fleet.RUNNERS[name]
    return bench_membership.RUNNERS[name]


def run_scenarios(names: Sequence[str], settings: Settings) -> list[Result]:
    missing = missing_components(service=settings.l4)
    if missing:
        raise ConfigurationError("; ".join(missing))
    aio = sorted(set(settings.strategies) & set(AIO_STRATEGIES))
    other = [name for name in names if name not in MEMBERSHIP_SCENARIOS]
    if aio and other:
        raise ConfigurationError(
            f"{', '.join(aio)} run in {', '.join(MEMBERSHIP_SCENARIOS)} only, not in "
            f"{', '.join(other)}"
        )
    results: list[Result] = []
    for name in names:
        began = time.monotonic()
        progress(f"scenario {name}")
        results += runner(name)(settings)
        progress(f"scenario {name}: done in {time.monotonic() - began:.1f} s")
    return results


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = run_scenarios(names, settings)
    if args.json:
        json.dump(document(results, settings), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_table(results)
    return 0
