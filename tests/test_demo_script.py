"""``scripts/demo.sh`` says what it does, one line per step with its time, and a line every few
seconds while pip installs; a current .venv is used as it is. Run in a copy of the layout whose
``.venv`` is a stand-in: its pip only writes what it was asked and sleeps, its ``grpc-balance``
echoes its arguments (no network, no real install)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import grpc_balance_mw

#: Each test runs the script in a copy of the repo layout: the slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PACKAGE_PARENT = Path(grpc_balance_mw.__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1 $2" == "-m pip" ]]; then
    echo "pip $*" >>"{calls}"
    echo "Collecting stand-in-package (from grpc_balance_mw[demo])"
    sleep "${{STAND_IN_PIP_S:-0.1}}"
    [[ -f "{fail}" ]] && {{ echo "ERROR: no matching distribution"; exit 1; }}
    echo "Successfully installed stand-in-package"
    exit 0
fi
exec {python} "$@"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """scripts/demo.sh and pyproject.toml beside a stand-in .venv."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    fake = FAKE_PYTHON.format(
        calls=tmp_path / "pip-calls",
        fail=tmp_path / "pip-fails",
        python=sys.executable,
    )
    _executable(bin_dir / "python", fake)
    _executable(bin_dir / "grpc-balance", '#!/usr/bin/env bash\necho "grpc-balance $*"\n')
    return tmp_path


def _demo_sh(layout: Path, *args: str, pip_s: float = 0.1) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DEMO_SH_HEARTBEAT_S": "1",
        "STAND_IN_PIP_S": str(pip_s),
        "PYTHONPATH": str(PACKAGE_PARENT),  # the stand-in .venv imports the package from here
    }
    return subprocess.run(
        ["bash", str(layout / "scripts" / "demo.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def _pip_calls(layout: Path) -> list[str]:
    calls = layout / "pip-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_each_step_is_a_line_and_a_long_install_says_it_is_still_going(layout: Path) -> None:
    done = _demo_sh(layout, "--calls", "5", pip_s=2.5)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "grpc-balance demo --calls 5\n"
    lines = done.stderr.splitlines()
    assert all(line.startswith("demo.sh: ") for line in lines), lines
    assert lines[0] == "demo.sh: [1/3] virtualenv .venv: exists"
    assert lines[1].startswith("demo.sh: [2/3] installing grpc_balance_mw[demo] into .venv")
    beats = [line for line in lines if line.startswith("demo.sh:   ... ")]
    assert any(": Collecting stand-in-package" in line for line in beats), lines
    assert any(line.startswith("demo.sh:       installed in ") for line in lines), lines
    assert lines[-1].startswith("demo.sh: [3/3] grpc-balance demo --calls 5 (set up in ")
    assert [call.split()[-1] for call in _pip_calls(layout)] == ["pip>=21.3", f"{layout}[demo]"]
    assert (layout / ".venv" / "demo-setup.log").read_text().count("Successfully installed") == 2


def test_a_current_venv_is_used_as_it_is(layout: Path) -> None:
    assert _demo_sh(layout).returncode == 0
    calls = _pip_calls(layout)
    again = _demo_sh(layout, "--json")
    assert again.returncode == 0, again.stderr
    assert again.stderr.splitlines()[:2] == [
        "demo.sh: [1/3] virtualenv .venv: exists",
        "demo.sh: [2/3] grpc_balance_mw[demo]: .venv is up to date (pyproject.toml unchanged)",
    ]
    assert _pip_calls(layout) == calls  # no second install
    assert again.stdout == "grpc-balance demo --json\n"


def test_a_venv_that_scripts_setup_made_is_current_too(layout: Path) -> None:
    assert _demo_sh(layout).returncode == 0
    venv = layout / ".venv"
    (venv / ".demo-stamp").rename(venv / ".setup-stamp")  # the same stamp, written by setup.sh
    again = _demo_sh(layout)
    assert "up to date" in again.stderr and len(_pip_calls(layout)) == 2


def test_a_failed_install_shows_pips_last_lines_and_stops(layout: Path) -> None:
    (layout / "pip-fails").touch()
    done = _demo_sh(layout)
    assert done.returncode == 1
    assert "ERROR: no matching distribution" in done.stderr
    assert "demo.sh: pip failed; the whole log is in" in done.stderr
    assert done.stdout == ""  # the demo did not run
    assert not (layout / ".venv" / ".demo-stamp").exists()
