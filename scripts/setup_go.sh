#!/usr/bin/env bash
# Optional: Go and Debian's grpc-go, so tests/test_grpc_js_server.py also runs the grpc-go recipe
# of examples/go (built in GOPATH mode: the project's machines reach no Go module proxy).
# Idempotent; needs root for apt-get. Never an error: the Go tests skip without it.
set -euo pipefail
say() { echo "setup_go: $*" >&2; }

if command -v go >/dev/null 2>&1 && [[ -d /usr/share/gocode/src/google.golang.org/grpc/health ]]; then
    say "go and golang-google-grpc-dev are installed"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    say "not root or no apt-get: the grpc-go recipe's tests will skip"
    exit 0
fi
say "installing golang-go and golang-google-grpc-dev with apt-get (the grpc-go recipe's tests)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends golang-go \
    golang-google-grpc-dev; } >/dev/null 2>&1; then
    say "apt-get failed: the grpc-go recipe's tests will skip"
    exit 0
fi
say "done"
