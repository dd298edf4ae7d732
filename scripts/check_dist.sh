#!/usr/bin/env bash
# Build the sdist and the wheel as a release would (`python -m build`, from a copy of the source
# tree, into a temporary directory), check them with `twine check --strict`, then check what they
# carry: py.typed, the license, no tests or scripts in the wheel, complete metadata, and no
# dependency outside the extras but the core three (a plain install must not pull in the
# harness's). tests/test_distribution.py runs it.
#
# Needs build and twine (the `test` extra) and the package index (build's isolated environment
# installs setuptools); BUILD_ARGS adds arguments to `python -m build` (--no-isolation: use the
# setuptools already installed). KEEP_DIST=dir copies the distributions there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/grpc-balance-dist.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say() { echo "check_dist: $*" >&2; }

# A copy of what git tracks (and new files it does not ignore), so the build writes no egg-info
# or build/ into the checkout and leaves out whatever else lies there.
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
        "$PYTHON" -c 'import os, sys
names = sys.stdin.buffer.read().split(b"\0")
sys.stdout.buffer.write(b"\0".join(n for n in names if n and os.path.isfile(n)))' |
        tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
    cp -a "$ROOT/." "$WORK/src/"
fi

say "python -m build ${BUILD_ARGS:-}"
# shellcheck disable=SC2086  # BUILD_ARGS is a list of arguments
if ! "$PYTHON" -m build ${BUILD_ARGS:-} --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1; then
    cat "$WORK/build.log" >&2
    say "FAILED: python -m build"
    exit 1
fi
say "built: $(cd "$WORK/dist" && ls | tr '\n' ' ')"
"$PYTHON" -m twine check --strict "$WORK/dist"/*

"$PYTHON" - "$WORK/dist" <<'PY'
import email.parser, pathlib, re, sys, tarfile, zipfile

dist = pathlib.Path(sys.argv[1])
(wheel_path,) = dist.glob("*.whl")
(sdist_path,) = dist.glob("*.tar.gz")
failures = []


def expect(condition, what):
    if not condition:
        failures.append(what)


with zipfile.ZipFile(wheel_path) as wheel:
    names = wheel.namelist()
    (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(wheel.read(metadata_name).decode())
    info = metadata_name.rsplit("/", 1)[0]
expect("grpc_balance_mw/py.typed" in names, "the wheel has grpc_balance_mw/py.typed")
expect(f"{info}/licenses/LICENSE" in names, "the wheel has its LICENSE")
strays = sorted({n.split("/")[0] for n in names} - {"grpc_balance_mw", info})
expect(not strays, f"the wheel holds the package alone, not {strays}")

plain = sorted(
    re.split(r"[<>=!~ ;\[(]", r, maxsplit=1)[0].lower()
    for r in metadata.get_all("Requires-Dist", [])
    if "extra ==" not in r
)
expect(
    plain == ["grpcio", "opentelemetry-api", "tenacity"],
    f"a plain install requires grpcio, opentelemetry-api, tenacity only, not {plain}",
)
extras = set(metadata.get_all("Provides-Extra", []))
expect({"server", "testing", "instrument", "test"} <= extras, f"the extras, got {extras}")
expect(metadata["License-Expression"] == "Apache-2.0", "License-Expression: Apache-2.0")
expect(metadata["Requires-Python"] == ">=3.10", "Requires-Python: >=3.10")
expect(metadata["Description-Content-Type"] == "text/markdown", "the README as markdown")
urls = {u.split(",")[0] for u in metadata.get_all("Project-URL", [])}
expect({"Homepage", "Source", "Issues", "Changelog"} <= urls, f"the project URLs, got {urls}")
expect(metadata.get_all("Keywords") or metadata.get("Keywords"), "keywords")
classifiers = set(metadata.get_all("Classifier", []))
for wanted in (
    "Development Status :: 4 - Beta",
    "Intended Audience :: Developers",
    "Operating System :: OS Independent",
    *(f"Programming Language :: Python :: 3.{minor}" for minor in (10, 11, 12, 13)),
    "Topic :: System :: Networking",
    "Framework :: AsyncIO",
    "Typing :: Typed",
):
    expect(wanted in classifiers, f"the classifier {wanted!r}")
expect(
    not any(c.startswith("License ::") for c in classifiers),
    "no License :: classifier beside License-Expression (PEP 639 forbids both)",
)

with tarfile.open(sdist_path) as sdist:
    members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
for wanted in ("LICENSE", "README.md", "pyproject.toml", "grpc_balance_mw/py.typed"):
    expect(wanted in members, f"the sdist has {wanted}")

for failure in failures:
    print(f"check_dist: FAILED: {failure}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY
if [[ -n "${KEEP_DIST:-}" ]]; then
    mkdir -p "$KEEP_DIST" && cp "$WORK/dist"/* "$KEEP_DIST/"
fi
say "ok: $(cd "$WORK/dist" && ls | tr '\n' ' ')"
