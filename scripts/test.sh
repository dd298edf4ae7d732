#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run what CI runs: lint, types, every test tier, the tests that need
# no cluster on the oldest declared dependencies (scripts/test_floors.sh), grpcio's internals on
# three grpcio versions (scripts/test_grpcio_versions.sh), every tier again on
# Python 3.10 but the bench runs, and the fast tier on 3.13 (scripts/test_python.sh).
#
#   bash scripts/test.sh --fast [pytest args]   setup, lint, types and the fast tier only
#   bash scripts/test.sh [pytest args]          all of it (CI: .ci/run)
#
# Tiers (markers in pyproject.toml): the fast tier is -m "not slow and not cluster", the pure core
# and in-process loopback servers, under 90 s on 2 cores; `cluster` needs haproxy, dnsmasq,
# iptables and network namespaces; `slow` is subprocess CLI runs, sweeps, faults, load, fork.
# Plain `pytest` runs every tier. SKIP_FLOORS=1 / SKIP_GRPCIO=1 / SKIP_PYTHONS=1 skip those steps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FAST_TIER="not slow and not cluster"
fast=0
if [[ "${1:-}" == --fast ]]; then
    fast=1
    shift
fi
started=$SECONDS
say() { echo "test.sh: [$((SECONDS - started)) s] $*" >&2; }

bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"

"$PY" -m ruff check grpc_balance_mw tests examples scripts
"$PY" -m ruff format --check grpc_balance_mw tests examples scripts
"$PY" -m mypy

# pytest, with exit 5 (nothing collected) a failure: a selection that matches nothing proves nothing.
run_pytest() {
    local status=0
    "$@" || status=$?
    if [[ $status -eq 5 ]]; then
        say "pytest collected no tests: treating that as a failure"
        return 1
    fi
    return $status
}

if ((fast)); then
    tier_started=$SECONDS
    run_pytest "$PY" -m pytest -m "$FAST_TIER" "$@"
    say "fast tier (-m \"$FAST_TIER\") passed in $((SECONDS - tier_started)) s (budget: 90 s on 2 cores)"
    exit 0
fi

tier_started=$SECONDS
run_pytest "$PY" -m pytest "$@"
say "every tier passed in $((SECONDS - tier_started)) s"
# The declared dependency floors, in throwaway venvs (a few minutes).
if [[ "${SKIP_FLOORS:-}" != 1 ]]; then
    bash scripts/test_floors.sh
fi
# grpcio's internals on its floor, newest release and newest pre-release (a few minutes).
if [[ "${SKIP_GRPCIO:-}" != 1 ]]; then
    bash scripts/test_grpcio_versions.sh
fi
# The other declared Pythons, each in a venv of its own (.venv310, .venv313).
if [[ "${SKIP_PYTHONS:-}" != 1 ]]; then
    # Every tier but the bench's own runs (-k "not bench": about 9 of its 30 min, measurement
    # harnesses whose Python-version-dependent parts the other tiers cover); 3.11 runs them.
    bash scripts/test_python.sh 3.10 -k "not bench" "$@"
    bash scripts/test_python.sh 3.13 -m "$FAST_TIER" "$@"
fi
say "all passed"
