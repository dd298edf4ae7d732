"""Regenerate the checked-in gRPC stubs from protos/ (run after editing a .proto).

    python scripts/generate_protos.py           # write the stubs into grpc_balance_mw/
    python scripts/generate_protos.py --check   # exit 1 if the checked-in stubs differ

The stubs are committed so that `pip install` from a fresh clone needs no protoc step. They are
made by one pinned, old grpcio-tools (GRPCIO_TOOLS), because both runtimes refuse generated
code newer than themselves: grpcio-tools 1.62's protoc writes protobuf 4.25 gencode, which
protobuf 4.21.6 up to 7.x load, and its _pb2_grpc neither checks the grpcio version nor passes
arguments that older grpcio lacks. When this interpreter has another grpcio-tools, the script
makes (once) a throwaway venv with the pinned one under ~/.cache and runs protoc there.
tests/test_protos.py checks the stubs against protos/ with whatever grpcio-tools is installed.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GRPCIO_TOOLS = "1.62.3"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grpc_balance_mw"


def sources() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def generate(out_dir: Path, python: str = sys.executable) -> None:
    """Run ``python``'s grpc_tools.protoc on every .proto into ``out_dir``."""
    args = [
        python,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources(),
    ]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"protoc failed ({done.returncode}): {done.stderr.strip()}")


def pinned_python() -> str:
    """A Python whose grpcio-tools is GRPCIO_TOOLS: this one, or a cached throwaway venv."""
    try:
        if metadata.version("grpcio-tools") == GRPCIO_TOOLS:
            return sys.executable
    except metadata.PackageNotFoundError:
        pass
    venv = CACHE / f"grpcio-tools-{GRPCIO_TOOLS}"
    python = venv / "bin" / "python"
    if not (venv / "ready").exists():
        print(f"generate_protos: making {venv} with grpcio-tools=={GRPCIO_TOOLS}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"grpcio-tools=={GRPCIO_TOOLS}"],
            check=True,
        )
        (venv / "ready").touch()
    return str(python)


def stale(python: str) -> list[str]:
    """The checked-in stubs that differ from what ``python``'s protoc makes now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), python)
        fresh = sorted(Path(tmp).rglob("*_pb2*.py*"))
        if not fresh:
            return ["protoc generated nothing"]
        return [
            str(path.relative_to(tmp))
            for path in fresh
            if not (ROOT / path.relative_to(tmp)).exists()
            or not filecmp.cmp(path, ROOT / path.relative_to(tmp), shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    python = pinned_python()
    if not args.check:
        generate(ROOT, python)
        return 0
    differing = stale(python)
    for path in differing:
        print(f"generate_protos: {path} is stale: run python scripts/generate_protos.py")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
