#!/usr/bin/env bash
# Set up what the demo needs and run it on the embedded local cluster: a virtualenv at .venv with
# grpc_balance_mw[demo] (editable), then `grpc-balance demo` (arguments pass through, e.g.
# --calls 300 --rate 100; --help lists them).
#
# The demo's default Service is the embedded proxy, so it needs no system package and no root;
# scripts/setup.sh (tests, lint, haproxy, promtool, Node.js, Go) is not run. A .venv that
# scripts/setup.sh made already has the demo's packages and is used as it is.
#
# One line per step on stderr, with the time it took; while pip installs, a line every 15 s
# says how long it has been and what pip is on. pip's own output goes to .venv/demo-setup.log.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
LOG="$VENV/demo-setup.log"
HEARTBEAT_S="${DEMO_SH_HEARTBEAT_S:-15}"  # seconds between the lines of a long pip install
say() { echo "demo.sh: $*" >&2; }
began=$SECONDS

# What the install depends on; the same string scripts/setup.sh stamps, so either one's stamp
# tells that .venv is current (setup.sh's [dev] includes the demo's packages).
want() { echo "$(cat "$ROOT/pyproject.toml" <("$VENV/bin/python" -V) | sha256sum | cut -c1-16) $ROOT"; }
current() {
    local stamp
    for stamp in "$VENV/.setup-stamp" "$VENV/.demo-stamp"; do
        if [[ -f "$stamp" && "$(cat "$stamp")" == "$(want)" ]] &&
            "$VENV/bin/python" -c "import grpc_balance_mw.cli.demo, matplotlib" 2>/dev/null; then
            return 0
        fi
    done
    return 1
}

# pip in the background, and a line every HEARTBEAT_S seconds while it runs: a first install
# takes about a minute, and a silent minute reads as a hang.
pip_install() {
    local started=$SECONDS next=$((SECONDS + HEARTBEAT_S)) pid last
    "$VENV/bin/python" -m pip install --progress-bar off "$@" >>"$LOG" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if ((SECONDS >= next)); then
            last="$(grep -E '^(Collecting|Downloading|Installing|Building|Processing)' "$LOG" |
                tail -n 1 | cut -c1-80 || true)"
            say "  ... $((SECONDS - started)) s${last:+: $last}"
            next=$((SECONDS + HEARTBEAT_S))
        fi
    done
    wait "$pid"
}

step=$SECONDS
if [[ -x "$VENV/bin/python" ]]; then
    say "[1/3] virtualenv .venv: exists"
else
    say "[1/3] virtualenv .venv: creating it with $(python3 -V)"
    python3 -m venv "$VENV"
    say "      created in $((SECONDS - step)) s"
fi

step=$SECONDS
if current; then
    say "[2/3] grpc_balance_mw[demo]: .venv is up to date (pyproject.toml unchanged)"
else
    say "[2/3] installing grpc_balance_mw[demo] into .venv with pip, editable (about a minute" \
        "the first time; log: .venv/demo-setup.log)"
    : >"$LOG"
    # An editable install of a pyproject.toml project needs pip >= 21.3 (a no-op when it is).
    if ! pip_install "pip>=21.3" || ! pip_install -e "$ROOT[demo]"; then
        tail -n 30 "$LOG" >&2
        say "pip failed; the whole log is in $LOG"
        exit 1
    fi
    want >"$VENV/.demo-stamp"
    say "      installed in $((SECONDS - step)) s"
fi

say "[3/3] grpc-balance demo $* (set up in $((SECONDS - began)) s; the demo itself takes 15 s or so, longer on a busy machine)"
exec "$VENV/bin/grpc-balance" demo "$@"
