#!/usr/bin/env bash
# Install checkov (PyPI) into a virtualenv of its own at .venv-checkov, so that
# tests/test_kubernetes_examples.py can run its Kubernetes checks on examples/kubernetes.
# checkov pins many dependencies of its own (boto3, networkx, pydantic...): kept apart, they
# never change what the project's .venv resolves. Idempotent: a second run installs nothing
# while the pinned version is there. When the install fails it says so and the test skips;
# under CI=true that is an error. pip's own output goes to .venv-checkov/setup.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-checkov"
# Pinned: a new checkov release adds checks, which would fail CI on manifests that did not change.
VERSION="3.3.30"
say() { echo "setup_checkov: $*" >&2; }
fail() {
    say "$*"
    if [[ "${CI:-}" == true ]]; then
        exit 1
    fi
    say "the checkov test will skip"
    exit 0
}

installed() {
    "$VENV/bin/python" -m pip show checkov 2>/dev/null | sed -n 's/^Version: //p'
}

if [[ -x "$VENV/bin/checkov" && "$(installed)" == "$VERSION" ]]; then
    say "checkov $VERSION is installed in .venv-checkov"
    exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the virtualenv $VENV (checkov's own)"
    python3 -m venv "$VENV" || fail "python3 -m venv failed"
fi
log="$VENV/setup.log"
say "installing checkov $VERSION into .venv-checkov (the first time takes one to two minutes; log: .venv-checkov/setup.log)"
if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
    "$VENV/bin/python" -m pip install "checkov==$VERSION"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    fail "pip could not install checkov; the whole log is in $log"
fi
say "checkov $("$VENV/bin/checkov" --version) is installed"
