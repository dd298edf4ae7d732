#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run everything CI runs: lint, types, the test suite, then the
# tests that need no cluster again on the oldest declared dependencies (scripts/test_floors.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
PY="$ROOT/.venv/bin/python"

"$PY" -m ruff check grpc_balance_mw tests examples scripts
"$PY" -m ruff format --check grpc_balance_mw tests examples scripts
"$PY" -m mypy

set +e
"$PY" -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
if [[ $status -ne 0 ]]; then
    exit $status
fi
# The declared dependency floors, in throwaway venvs (about a minute; SKIP_FLOORS=1 skips).
if [[ "${SKIP_FLOORS:-}" != 1 ]]; then
    bash scripts/test_floors.sh
fi
