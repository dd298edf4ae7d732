"""Predial against the plain channel, over every L4 Service, back to back and paced.

``python scripts/bench_predial.py [--runs 3] [--rates 0,200] [--l4 userspace,haproxy,iptables]
[--compare PATH]``

Runs ``grpc-balance bench --scenario steady --strategy plain --strategy balanced-predial`` once
per (run, L4, rate), interleaved so drift in the machine's speed hits them all alike, and prints
each run's ratio of medians (balanced-predial p50 / plain p50), then the median ratio per L4 and
rate. Only ratios from the same invocation compare: the machine may be shared.

``--compare PATH`` also runs each invocation with ``PYTHONPATH=PATH`` (another copy of the
package, e.g. ``git archive main grpc_balance_mw | tar -x -C /tmp/main``) right beside this one.
``iptables`` needs root; each invocation takes 10-30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

#: Calls per strategy per invocation: back to back, and paced (fewer: they take longer).
CALLS = {True: 3000, False: 2000}


def one_run(l4: str, rate: float, pythonpath: str | None) -> tuple[float, float]:
    """One bench invocation: (plain p50, balanced-predial p50) in ms."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    command = [
        sys.executable, "-m", "grpc_balance_mw.cli", "bench", "--scenario", "steady",
        "--l4", l4, "--strategy", "plain", "--strategy", "balanced-predial", "--json",
        "--rate", f"{rate:g}", "--calls", str(CALLS[rate == 0]),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"bench failed ({l4}, rate {rate:g}):\n{done.stderr[-2000:]}")
    results = {s["strategy"]: s for s in json.loads(done.stdout)["scenarios"]}
    return results["plain"]["p50_ms"], results["balanced-predial"]["p50_ms"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rates", default="0,200", help="calls per second; 0: back to back")
    parser.add_argument("--l4", default="userspace,haproxy,iptables")
    parser.add_argument("--compare", type=Path, help="another copy of the package to run beside")
    args = parser.parse_args(argv)
    if not 0 < args.runs <= 10:
        parser.error("--runs 1..10")
    rates = [float(rate) for rate in args.rates.split(",")]
    versions: dict[str, str | None] = {"this": None}
    if args.compare is not None:
        versions = {"compared": str(args.compare.resolve()), "this": str(Path.cwd())}
    ratios: dict[tuple[str, float, str], list[float]] = {}
    for run in range(args.runs):
        for l4 in args.l4.split(","):
            for rate in rates:
                for version, path in versions.items():
                    plain, predial = one_run(l4, rate, path)
                    ratios.setdefault((l4, rate, version), []).append(predial / plain)
                    print(
                        f"run {run + 1} {l4:9} rate {rate:5g} {version:8} plain p50 {plain:.3f} "
                        f"balanced-predial p50 {predial:.3f} ratio {predial / plain:.2f}",
                        flush=True,
                    )
    print("\nbalanced-predial p50 / plain p50")
    for (l4, rate, version), values in ratios.items():
        runs = " ".join(f"{value:.2f}" for value in values)
        print(f"{l4:9} rate {rate:5g} {version:8} {runs}  median {statistics.median(values):.2f}")


if __name__ == "__main__":
    main()
