#!/usr/bin/env bash
# Install the Node.js example pod's packages (examples/node: @grpc/grpc-js, @grpc/proto-loader,
# pinned by package-lock.json) so tests/test_grpc_js_server.py can run it. Idempotent: nothing
# is installed when node_modules already matches the lock file.
# Without node (or npm) it says so and does nothing; under CI=true that is an error, because
# the test would fail there anyway and the reason belongs at the top of the log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
APP="$ROOT/examples/node"
say() { echo "setup_node: $*" >&2; }

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [[ "${CI:-}" == "true" ]]; then
        say "node and npm are required in CI (the grpc-js pod test); install Node.js >= 18"
        exit 1
    fi
    say "node or npm not found: tests/test_grpc_js_server.py will skip"
    exit 0
fi

# The stamp is the lock file's and node's hash at the last successful install.
stamp="$APP/node_modules/.setup-stamp"
want="$(cat "$APP/package-lock.json" <(node --version) | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -d "$APP/node_modules/@grpc/grpc-js" ]]; then
    say "examples/node/node_modules is up to date"
    exit 0
fi
say "npm ci in examples/node ($(node --version); log: examples/node/npm.log)"
# --ignore-scripts: the packages need no install script (protobufjs's only checks versions).
if ! (cd "$APP" && npm ci --ignore-scripts --no-audit --no-fund) >"$APP/npm.log" 2>&1; then
    tail -n 30 "$APP/npm.log" >&2
    say "npm ci failed; the whole log is in examples/node/npm.log"
    exit 1
fi
echo "$want" >"$stamp"
say "done"
