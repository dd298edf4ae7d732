#!/usr/bin/env bash
# Prove the declared dependency floors; scripts/test.sh runs this after the main suite.
#
# 1. A production client that pins grpcio 1.62 and protobuf 4.25 installs the package: pip
#    resolves without touching either (no constraints given), adds only the core dependencies,
#    and the channel wrapper and the server middleware work there (scripts/smoke_client.py).
# 2. With every direct dependency at its declared floor (the oldest grpcio, protobuf,
#    OpenTelemetry, pytest... that pyproject.toml allows), the tests that need no local cluster
#    pass. The cluster's own tests run in the main suite, on the newest versions.
# 3. The checked-in stubs are byte for byte what the pinned grpcio-tools makes.
#
# Needs PyPI (or the pip cache). CLIENT_GRPCIO / CLIENT_PROTOBUF choose step 1's pins.
set -euo pipefail
started=$SECONDS
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
CLIENT_GRPCIO="${CLIENT_GRPCIO:-1.62.3}"
CLIENT_PROTOBUF="${CLIENT_PROTOBUF:-4.25.8}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/grpc-balance-floors.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say() { echo "test_floors: [$((SECONDS - started)) s] $*" >&2; }
pip_quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location .* is ignored" || true; } >&2; }


# Every direct dependency at its floor: `name>=X` in pyproject.toml becomes `name==X`; where
# extras name one package twice, the higher floor wins.
"$PYTHON" - "$WORK/floors.txt" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = list(project["dependencies"])
for extra in ("server", "testing", "demo", "bench", "instrument", "test"):
    requirements += project["optional-dependencies"][extra]
floors = {}
for requirement in requirements:
    if requirement.startswith(project["name"]):
        continue  # this package's own extras
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)", requirement.strip())
    if match is None:
        sys.exit(f"test_floors: no plain floor in {requirement!r}")
    name, version = match[1].lower(), match[2]
    key = lambda v: [int(p) if p.isdigit() else p for p in re.split(r"[.a-z]+", v) if p]
    if name not in floors or key(version) > key(floors[name]):
        floors[name] = version
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(floors.items())))
PY
say "declared floors: $(tr '\n' ' ' <"$WORK/floors.txt")"

say "1/3 a client pinned to grpcio==$CLIENT_GRPCIO protobuf==$CLIENT_PROTOBUF: pip install ."
"$PYTHON" -m venv "$WORK/client"
PY="$WORK/client/bin/python"
pip_quiet "$PY" -m pip install -q "grpcio==$CLIENT_GRPCIO" "protobuf==$CLIENT_PROTOBUF"
"$PY" -m pip freeze --all | sort >"$WORK/before.txt"
# A plain `pip install .`, no constraints: nothing it declares may need a newer grpcio or protobuf.
pip_quiet "$PY" -m pip install -q "$ROOT"
"$PY" -m pip freeze --all | sort >"$WORK/after.txt"
for pin in "grpcio==$CLIENT_GRPCIO" "protobuf==$CLIENT_PROTOBUF"; do
    grep -qix "$pin" "$WORK/after.txt" || { say "FAILED: pip changed $pin"; exit 1; }
done
added="$(comm -13 "$WORK/before.txt" "$WORK/after.txt" | sed 's/[=@ ].*//' | tr 'A-Z_' 'a-z-' |
    sort | tr '\n' ' ')"
say "pip install . added: $added"
# The core dependencies and what they depend on (opentelemetry-api's vary with its version).
allowed=" grpc-balance-mw opentelemetry-api tenacity deprecated wrapt "
allowed+=" importlib-metadata zipp typing-extensions setuptools "
for dist in $added; do
    [[ "$allowed" == *" $dist "* ]] || { say "FAILED: pip install . pulled in $dist"; exit 1; }
done
"$PY" scripts/smoke_client.py

say "2/3 every direct dependency at its floor: the tests that need no cluster"
"$PYTHON" -m venv "$WORK/floors"
PY="$WORK/floors/bin/python"
pip_quiet "$PY" -m pip install -q "$(grep '^grpcio==' "$WORK/floors.txt")" \
    "$(grep '^protobuf==' "$WORK/floors.txt")"
pip_quiet "$PY" -m pip install -q "$ROOT[test]" -c "$WORK/floors.txt"
say "installed: $("$PY" -m pip freeze | grep -iE '^(grpcio|protobuf|opentelemetry|tenacity|pytest)' |
    tr '\n' ' ')"
(cd "$WORK" && "$PY" -m pytest -q -p no:cacheprovider -m "not cluster and not packaging" "$ROOT/tests" \
    --rootdir "$ROOT" -c "$ROOT/pyproject.toml")

say "3/3 the checked-in stubs are what the pinned grpcio-tools makes"
"$PYTHON" scripts/generate_protos.py --check
say "floors proven in $((SECONDS - started)) s"
