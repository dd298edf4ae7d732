#!/usr/bin/env bash
# Prove the declared floors (CI runs this after the main suite, from scripts/test.sh).
#
# 1. A client that pins the oldest grpcio and protobuf this package declares (grpcio 1.62,
#    protobuf 4.21/4.25) installs it: `pip install .` resolves without upgrading either, and
#    pulls in only the core dependencies.
# 2. With every direct dependency at its declared floor, the tests that need no local cluster
#    pass (the cluster's own tests run in the main suite on the newest versions).
# 3. The checked-in stubs are byte for byte what the pinned grpcio-tools makes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/grpc-balance-floors.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say() { echo "test_floors: $*" >&2; }
started=$SECONDS

# Every direct dependency at its floor: `name>=X` in pyproject becomes `name==X`.
"$PYTHON" - "$WORK/floors.txt" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
requirements = list(project["dependencies"])
for extra in ("testing", "demo", "bench", "test"):
    requirements += project["optional-dependencies"][extra]
floors = {}
for requirement in requirements:
    if requirement.startswith(project["name"]):
        continue  # this package's own extras
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)", requirement.strip())
    if match is None:
        sys.exit(f"test_floors: no plain floor in {requirement!r}")
    floors[match[1].lower()] = match[2]
open(sys.argv[1], "w").write("".join(f"{n}=={v}\n" for n, v in sorted(floors.items())))
PY
GRPCIO="$(grep '^grpcio==' "$WORK/floors.txt")"
PROTOBUF="$(grep '^protobuf==' "$WORK/floors.txt")"
say "floors: $(tr '\n' ' ' <"$WORK/floors.txt")"

say "1/3 a client with $GRPCIO and $PROTOBUF installs the package"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q "$GRPCIO" "$PROTOBUF"
"$PY" -m pip freeze --all | sort >"$WORK/before.txt"
# The client's own pins, as its requirements or lock file holds them.
printf '%s\n%s\n' "$GRPCIO" "$PROTOBUF" >"$WORK/client-pins.txt"
"$PY" -m pip install -q --no-cache-dir "$ROOT" -c "$WORK/client-pins.txt"
"$PY" -m pip freeze --all | sort >"$WORK/after.txt"
for pin in "$GRPCIO" "$PROTOBUF"; do
    grep -qix "$pin" "$WORK/after.txt" || { say "FAILED: $pin was changed"; exit 1; }
done
# What `pip install .` added: the package, its core dependencies and theirs, nothing else.
added="$(comm -13 "$WORK/before.txt" "$WORK/after.txt" | sed 's/[=@ ].*//' | tr 'A-Z_' 'a-z-' | sort | tr '\n' ' ')"
say "pip install . added: $added"
expected=" grpc-balance-mw grpcio-health-checking opentelemetry-api tenacity "
# opentelemetry-api's own dependencies, whichever its version declares
allowed="$expected deprecated wrapt importlib-metadata zipp typing-extensions setuptools "
for dist in $added; do
    [[ "$allowed" == *" $dist "* ]] || { say "FAILED: pip install . pulled in $dist"; exit 1; }
done
"$PY" - <<'PY'
import grpc, google.protobuf
from grpc_balance_mw.client import observe_channel
from grpc_balance_mw.server import PodIdentityInterceptor, add_health
print(f"test_floors: imports fine on grpcio {grpc.__version__}, protobuf {google.protobuf.__version__}")
PY

say "2/3 every direct dependency at its floor: the tests that need no cluster"
"$PY" -m pip install -q "$ROOT[test]" -c "$WORK/floors.txt"
"$PY" -m pip freeze | grep -iE '^(grpcio|grpcio-health-checking|protobuf|opentelemetry-[a-z-]+|tenacity|pytest[a-z-]*)==' | tr '\n' ' ' >&2
echo >&2
"$PY" -m pytest -q -p no:cacheprovider -m "not cluster" tests

say "3/3 the stubs are what grpcio-tools $("$PYTHON" -c 'import sys; sys.path.insert(0, "scripts"); import generate_protos as g; print(g.GRPCIO_TOOLS)') makes"
"$PYTHON" scripts/generate_protos.py --check
say "floors proven in $((SECONDS - started)) s"
