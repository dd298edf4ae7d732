#!/usr/bin/env bash
# The package reads a few grpcio internals (grpc_balance_mw/_grpcio.py, grpc_balance_mw/aio/_grpcio.py),
# each with a fallback. This proves the fast paths are live, and the channels keep grpcio's
# contract, on three grpcio versions, each in a throwaway venv:
#
#   floor    the grpcio floor pyproject.toml declares (`grpcio>=X` -> grpcio==X)
#   release  the newest grpcio release
#   pre      the newest pre-release (`pip install --pre grpcio`: the release again when no
#            pre-release is newer; the version each venv got is printed)
#
# In each: the package with its testing and bench extras and pytest, then tests/test_grpcio_internals.py and the sync and
# aio channel contract tests. scripts/test.sh runs this after the main suite (SKIP_GRPCIO=1 skips
# it). Needs PyPI (or the pip cache). GRPCIO_VERSIONS="floor release" runs a subset.
set -euo pipefail
started=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/grpc-balance-grpcio.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
say() { echo "test_grpcio_versions: [$((SECONDS - started)) s] $*" >&2; }
pip_quiet() { PIP_DISABLE_PIP_VERSION_CHECK=1 "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; } >&2; }
TESTS=(tests/test_grpcio_internals.py tests/test_channel_contract_sync.py tests/test_channel_contract_aio.py)

# The grpcio floor, and what the three test files need from the test extra (pytest and its
# plugins; the rest of it, e.g. kubernetes-validate and matplotlib, only slows the installs).
read -r floor pytest_deps < <("$PYTHON" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
floor = next(
    re.fullmatch(r"grpcio>=([0-9][^,;\s]*)", d.strip())[1]
    for d in project["dependencies"]
    if d.startswith("grpcio>=")
)
pytest = [r for r in project["optional-dependencies"]["test"] if r.startswith("pytest")]
print(floor, " ".join(pytest))
PY
)

# One venv per grpcio version, installed side by side (mostly downloads and unpacking).
install() {  # install WHICH: the venv $WORK/WHICH, its grpcio version in $WORK/WHICH.version
    local which="$1" venv="$WORK/$1" spec
    case "$which" in
        floor) spec=("grpcio==$floor") ;;
        release) spec=(--upgrade grpcio) ;;
        pre) spec=(--upgrade --pre grpcio) ;;
        *) echo "unknown version kind $which (floor, release, pre)" >&2; return 2 ;;
    esac
    "$PYTHON" -m venv "$venv"
    pip_quiet "$venv/bin/python" -m pip install -q --no-compile "${spec[@]}"
    "$venv/bin/python" -c 'import grpc; print(grpc.__version__)' >"$WORK/$which.version"
    # The package and the tests' needs, grpcio held where it is (a pre-release stays).
    echo "grpcio==$(cat "$WORK/$which.version")" >"$WORK/$which.txt"
    # shellcheck disable=SC2086  # pytest_deps: one requirement per word
    pip_quiet "$venv/bin/python" -m pip install -q --no-compile "$wheel[testing,bench]" $pytest_deps \
        -c "$WORK/$which.txt"
}

# The package's wheel, built once (builds of one source tree side by side collide).
pip_quiet "$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
wheel="$(ls "$WORK"/dist/grpc_balance_mw-*.whl)"

kinds=(${GRPCIO_VERSIONS:-floor release pre})
say "installing ${kinds[*]} (floor: grpcio $floor; tests need: $pytest_deps)"
declare -A kind_of  # install pid -> floor/release/pre
for which in "${kinds[@]}"; do
    install "$which" >"$WORK/$which.log" 2>&1 &
    kind_of[$!]="$which"
done
# Each venv's tests run as soon as it is installed, while the others still install.
failed=()
tested=" "
while ((${#kind_of[@]})); do
    status=0
    wait -n -p done_pid "${!kind_of[@]}" || status=$?
    which="${kind_of[$done_pid]}"
    unset "kind_of[$done_pid]"
    if ((status)); then
        say "$which: install FAILED:"
        cat "$WORK/$which.log" >&2
        failed+=("$which=install")
        continue
    fi
    version="$(cat "$WORK/$which.version")"
    if [[ "$tested" == *" $version "* ]]; then
        say "$which: grpcio $version, the version of a run above (no newer pre-release): not run again"
        continue
    fi
    tested+="$version "
    say "$which: grpcio $version installed; running ${TESTS[*]}"
    if (cd "$WORK" && "$WORK/$which/bin/python" -m pytest -q -p no:cacheprovider \
        "${TESTS[@]/#/$ROOT/}" --rootdir "$ROOT" -c "$ROOT/pyproject.toml"); then
        say "$which: grpcio $version passed"
    else
        say "$which: grpcio $version FAILED"
        failed+=("$which=$version")
    fi
    rm -rf "${WORK:?}/$which"
done
if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "grpcio versions passed in $((SECONDS - started)) s"
