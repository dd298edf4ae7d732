#!/usr/bin/env bash
# Install promtool (Debian's `prometheus` package ships it) when it is missing, so that
# tests/test_prometheus.py can check examples/prometheus/alerts.yml with `promtool check rules`
# and run its rule tests with `promtool test rules`. Idempotent.
#
# The package also ships the Prometheus server and its service; only promtool is wanted, so the
# service is kept from starting during the install (a policy-rc.d that refuses, as container
# images have). Without root, or when apt fails, it says so and the tests skip; under CI=true
# that is an error.
set -euo pipefail
say() { echo "setup_prometheus: $*" >&2; }
fail() {
    say "$*"
    if [[ "${CI:-}" == true ]]; then
        exit 1
    fi
    say "the promtool tests will skip"
    exit 0
}

if command -v promtool >/dev/null 2>&1; then
    say "promtool is installed ($(promtool --version 2>&1 | head -n 1))"
    exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
    fail "promtool is missing and this is not root: install Debian's prometheus package"
fi
command -v apt-get >/dev/null 2>&1 || fail "promtool is missing and there is no apt-get"

policy=/usr/sbin/policy-rc.d
added_policy=
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# setup_prometheus.sh: start no service while installing\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
fi
remove_policy() {
    if [[ -n "$added_policy" ]]; then
        rm -f "$policy"
    fi
}
trap remove_policy EXIT

say "installing Debian's prometheus package with apt-get (for promtool)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; then
    fail "apt-get could not install prometheus"
fi
command -v promtool >/dev/null 2>&1 || fail "the prometheus package installed no promtool"
say "promtool is installed ($(promtool --version 2>&1 | head -n 1))"
