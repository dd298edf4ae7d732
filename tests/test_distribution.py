"""What pip and a release see of the package: the `server` extra installed beside an application
pinned to an old grpcio and protobuf changes neither and serves health there; the sdist and the
wheel pass `twine check --strict` and carry complete metadata (scripts/check_dist.sh).

Both make fresh environments from the package index: marked ``packaging``; without the index
they skip, and under CI=true they fail."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parent.parent
PINS = ("grpcio==1.62.3", "protobuf==4.25.8")  # a production client's, as in test_floors.sh

pytestmark = [pytest.mark.packaging, pytest.mark.slow, pytest.mark.timeout(900)]

# Run inside the fresh environment: a sync and an aio server with add_health() and the identity
# interceptor, checked with the package's own hand-encoded client on loopback.
SERVE_AND_CHECK = """
import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

from grpc_balance_mw import PodIdentity, pod_from_metadata
from grpc_balance_mw import server as sync_server
from grpc_balance_mw.aio import server as aio_server
from grpc_balance_mw.health_check import NOT_SERVING, SERVING, check_method

IDENTITY = PodIdentity("pinned-0")

stamping = sync_server.PodIdentityInterceptor(IDENTITY)
server = grpc.server(ThreadPoolExecutor(2), interceptors=[stamping])
health = sync_server.add_health(server, services=("a.B",))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    status, call = check_method(channel).with_call("a.B", timeout=10)
    assert status == SERVING and pod_from_metadata(call.initial_metadata()) == IDENTITY
    health.set_serving(False)
    assert check_method(channel)("", timeout=10) == NOT_SERVING
server.stop(None).wait()


async def main():
    server = grpc.aio.server(interceptors=[aio_server.PodIdentityInterceptor(IDENTITY)])
    await aio_server.add_health(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = check_method(channel)("", timeout=10)
        assert await call == SERVING
        assert pod_from_metadata(await call.initial_metadata()) == IDENTITY
    await server.stop(None)


asyncio.run(main())
print("served health with grpcio", grpc.__version__)
"""


def _run(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip (fail under CI=true) where pip cannot reach the package index."""
    dest = tmp_path_factory.mktemp("index")
    reached = _run(
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dest, PINS[0], timeout=180
    )
    require(reached.returncode == 0, f"no package index for pip: {reached.stderr[-300:]}")


def _ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, (
        f"{what} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


def _frozen(python: Path) -> set[str]:
    out = _ok(_run(python, "-m", "pip", "freeze", "--all"), "pip freeze")
    return {line.strip().lower() for line in out.splitlines() if line.strip()}


def test_the_server_extra_beside_pinned_grpcio_changes_nothing_and_serves_health(
    package_index: None, tmp_path: Path
) -> None:
    _ok(_run(sys.executable, "-m", "venv", tmp_path / "venv"), "python -m venv")
    python = tmp_path / "venv" / "bin" / "python"
    _ok(_run(python, "-m", "pip", "install", "-q", *PINS), "pip install the pins")
    before = _frozen(python)
    assert set(PINS) <= before
    # A plain `pip install '.[server]'`, no constraints, as the application's team would run it.
    _ok(_run(python, "-m", "pip", "install", "-q", f"{ROOT}[server]"), "pip install .[server]")
    after = _frozen(python)
    assert set(PINS) <= after, sorted(after - before)  # neither upgraded
    names = {line.split("=")[0].split(" @ ")[0] for line in after}
    assert "grpcio-health-checking" not in names
    assert "grpc-balance-mw" in names or "grpc_balance_mw" in names
    _ok(_run(python, "-m", "pip", "check"), "pip check")
    script = tmp_path / "serve_and_check.py"
    script.write_text(SERVE_AND_CHECK)
    out = _ok(_run(python, script, timeout=120), "add_health() in the pinned environment")
    assert "served health with grpcio 1.62.3" in out


def test_the_distributions_pass_twine_check_and_carry_complete_metadata(
    package_index: None,
) -> None:
    for module in ("build", "twine"):
        require(importlib.util.find_spec(module) is not None, f"{module} (the test extra)")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_dist.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "check_dist: ok:" in result.stderr
    assert result.stdout.count("PASSED") == 2  # twine: the wheel and the sdist
