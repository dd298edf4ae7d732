#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo on the embedded local cluster:
# `grpc-balance demo` (arguments pass through, e.g. --calls 300 --rate 100; --help lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/grpc-balance" demo "$@"
