#!/usr/bin/env bash
# Run the tests on another Python: bash scripts/test_python.sh 3.10 [pytest arguments]
#
# The package declares Python >= 3.10; the main venv (.venv, scripts/setup.sh) is one version.
# This one finds the interpreter (PATH, then pyenv's versions, then `pyenv install` under CI),
# keeps a venv of its own (.venv310 for 3.10) with the package and its test extra, and runs
# pytest there.
# scripts/test.sh runs it for 3.10 (every tier but the bench runs) and 3.13 (the fast tier).
#
# A missing interpreter is a failure under CI=true (a CI that silently skips a declared Python
# proves nothing) and a warning elsewhere.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
version="${1:?usage: test_python.sh X.Y [pytest arguments]}"
shift
[[ "$version" =~ ^3\.[0-9]+$ ]] || { echo "test_python: want a version like 3.10, not $version" >&2; exit 2; }
VENV="$ROOT/.venv${version/./}"
started=$SECONDS
say() { echo "test_python $version: [$((SECONDS - started)) s] $*" >&2; }

is_version() {  # is_version PATH: PATH runs and is Python $version
    [[ -x "$1" ]] && "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$version'.split('.'))))" \
        >/dev/null 2>&1
}

find_python() {
    local candidate root
    for candidate in "$(command -v "python$version" 2>/dev/null || true)" "/usr/bin/python$version" \
        "/usr/local/bin/python$version"; do
        if [[ -n "$candidate" ]] && is_version "$candidate"; then echo "$candidate"; return 0; fi
    done
    # pyenv's versions, newest patch release first (pyenv need not be on PATH for this).
    root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    for candidate in $(ls -d "$root/versions/$version".* 2>/dev/null | sort -rV); do
        if is_version "$candidate/bin/python$version"; then
            echo "$candidate/bin/python$version"
            return 0
        fi
    done
    return 1
}

if ! PYTHON="$(find_python)"; then
    # A build from source takes minutes: CI does it, a developer is told how.
    if [[ "${CI:-}" == true ]] && command -v pyenv >/dev/null 2>&1; then
        say "no Python $version here: pyenv install $version (a build from source, minutes)"
        pyenv install --skip-existing "$version" >&2 || say "pyenv install $version failed"
    fi
    if ! PYTHON="$(find_python)"; then
        message="Python $version not found on PATH or in pyenv's versions"
        if [[ "${CI:-}" == true ]]; then
            say "FAILED: $message; CI must test every declared Python"
            exit 1
        fi
        say "skipped: $message (pyenv install $version adds it)"
        exit 0
    fi
fi

# (Re)install only when what pip would read changed and the package still imports.
stamp="$VENV/.setup-stamp"
want="$(cat "$ROOT/pyproject.toml" <("$PYTHON" -V 2>&1) | sha256sum | cut -c1-16) $ROOT"
if [[ ! -x "$VENV/bin/python" ]] || ! is_version "$VENV/bin/python"; then
    say "creating $VENV with $PYTHON"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]] ||
    ! "$VENV/bin/python" -c "import grpc_balance_mw.cli" 2>/dev/null; then
    log="$VENV/setup.log"
    say "installing grpc_balance_mw[test] into $VENV, editable (log: $log)"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
        "$VENV/bin/python" -m pip install -e "$ROOT[test]"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        say "FAILED: pip; the whole log is in $log"
        exit 1
    fi
    echo "$want" >"$stamp"
fi

say "pytest on $("$VENV/bin/python" -V 2>&1), grpcio $("$VENV/bin/python" -c 'import grpc; print(grpc.__version__)')"
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
    say "FAILED: pytest collected no tests"
    exit 1
fi
say "pytest exited $status"
exit $status
