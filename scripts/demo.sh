#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo on the embedded local cluster.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m grpc_balance_mw.demo "$@"
