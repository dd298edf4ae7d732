#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for grpc_balance_mw: the local cluster's system parts
# (haproxy, dnsmasq, iptables, iproute2) and a virtualenv at .venv with the package and its
# test/dev extras. Idempotent: a second run installs nothing unless pyproject.toml changed.
# Says what it does, one line per step on stderr; pip's own output goes to .venv/setup.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
say() { echo "setup: $*" >&2; }
began=$SECONDS

missing=()
for tool in haproxy:haproxy dnsmasq:dnsmasq-base nginx:nginx-light iptables:iptables ip:iproute2; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        say "installing ${missing[*]} with apt-get (the local cluster's parts; a minute or more on a bare machine)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "not root, cannot install ${missing[*]}: cluster tests will skip"
    fi
fi

# promtool, for the shipped Prometheus rules (tests/test_prometheus.py).
bash "$ROOT/scripts/setup_prometheus.sh"
# checkov, in its own .venv-checkov, for the manifests' checks (tests/test_kubernetes_examples.py).
bash "$ROOT/scripts/setup_checkov.sh"
# Node.js's grpc-js and Go's grpc-go pods of examples/ (tests/test_grpc_js_server.py).
bash "$ROOT/scripts/setup_node.sh"
bash "$ROOT/scripts/setup_go.sh"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the virtualenv $VENV"
    python3 -m venv "$VENV"
fi

# Reinstall only when what pip would read changed (and the package still imports).
stamp="$VENV/.setup-stamp"
want="$(cat "$ROOT/pyproject.toml" <("$VENV/bin/python" -V) | sha256sum | cut -c1-16) $ROOT"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
    "$VENV/bin/python" -c "import grpc_balance_mw.cli" 2>/dev/null; then
    say ".venv is up to date (pyproject.toml unchanged)"
    exit 0
fi
log="$VENV/setup.log"
: >"$log"
# pip in the background, and a line every 15 s while it runs (a first install takes about a
# minute, and a silent minute reads as a hang).
pip_install() {
    local started=$SECONDS next=$((SECONDS + 15)) pid last
    "$VENV/bin/python" -m pip install --progress-bar off "$@" >>"$log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if ((SECONDS >= next)); then
            last="$(grep -E '^(Collecting|Downloading|Installing|Building|Processing)' "$log" |
                tail -n 1 | cut -c1-80 || true)"
            say "  ... $((SECONDS - started)) s${last:+: $last}"
            next=$((SECONDS + 15))
        fi
    done
    wait "$pid"
}
say "installing grpc_balance_mw[dev] into .venv, editable (the first time takes about a minute; log: .venv/setup.log)"
if ! pip_install --upgrade pip || ! pip_install -e "$ROOT[dev]"; then
    tail -n 30 "$log" >&2
    say "pip failed; the whole log is in $log"
    exit 1
fi
echo "$want" >"$stamp"
say "done in $((SECONDS - began)) s"
