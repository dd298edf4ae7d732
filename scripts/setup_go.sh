#!/usr/bin/env bash
# Go and Debian's grpc-go, so tests/test_grpc_js_server.py also runs the grpc-go recipe of
# examples/go (built in GOPATH mode: the project's machines reach no Go module proxy).
# Idempotent; needs root for apt-get. Without it the Go tests skip, and under CI=true fail.
set -euo pipefail
say() { echo "setup_go: $*" >&2; }
give_up() {
    say "$*"
    [[ "${CI:-}" == true ]] && exit 1
    exit 0
}

if command -v go >/dev/null 2>&1 && [[ -d /usr/share/gocode/src/google.golang.org/grpc/health ]]; then
    say "go and golang-google-grpc-dev are installed"
    exit 0
fi
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    give_up "not root or no apt-get: the grpc-go recipe's tests will skip"
fi
say "installing golang-go and golang-google-grpc-dev with apt-get (the grpc-go recipe's tests)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends golang-go \
    golang-google-grpc-dev; } >/dev/null 2>&1; then
    give_up "apt-get failed: the grpc-go recipe's tests will skip"
fi
say "done"
