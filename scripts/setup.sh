#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for grpc_balance_mw: the local cluster's system parts
# (haproxy, dnsmasq, iptables, iproute2) and a virtualenv at .venv with the package and its
# test/dev extras. Idempotent: a second run installs nothing new. Source it or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

missing=()
for tool in haproxy:haproxy dnsmasq:dnsmasq-base nginx:nginx-light iptables:iptables ip:iproute2; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        echo "setup: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: not root, cannot install ${missing[*]}: cluster tests will skip" >&2
    fi
fi

if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
    python3 -m venv "$ROOT/.venv"
fi
"$ROOT/.venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT[dev]"
