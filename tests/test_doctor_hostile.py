"""``grpc-balance doctor`` against hostile health servers: what a server says is shown escaped on
one line, and a server that never answers cannot hold the doctor past ``--max-seconds``."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from leak_fixtures import server_with_own_workers

from grpc_balance_mw.cli.doctor import DoctorOptions, diagnose, printable

CHECK = "/grpc.health.v1.Health/Check"
FORGED = "fine\r\n\nverdict:    OK per-request: all good\x1b]0;owned\x07\x1b[2J\x9b31m"


def _serve(check: Callable[[bytes, grpc.ServicerContext], bytes]) -> tuple[grpc.Server, str]:
    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )
    server = server_with_own_workers(4, handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def forging() -> Iterator[str]:
    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNAVAILABLE, FORGED)
        return b""

    server, target = _serve(check)
    yield target
    server.stop(None).wait(10)


@pytest.fixture
def hanging() -> Iterator[str]:
    release = threading.Event()

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        release.wait(60)  # never answers while the test runs
        return b""

    server, target = _serve(check)
    yield target
    release.set()
    server.stop(None).wait(10)


def test_a_forged_status_message_is_escaped_on_one_line(forging: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "grpc_balance_mw.cli", "doctor", forging, "--samples", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("verdict:")]
    assert len(verdicts) == 1 and "PROBLEM unreachable" in verdicts[0], done.stdout
    assert not any(ord(char) < 32 and char != "\n" for char in done.stdout), repr(done.stdout)
    assert "\x1b" not in done.stdout and "\x9b" not in done.stdout
    assert r"fine\r\n\nverdict:    OK per-request: all good\x1b]0;owned\x07" in verdicts[0]


def test_printable_escapes_what_a_terminal_would_act_on_and_cuts_long_text() -> None:
    assert printable("pod-a ok") == "pod-a ok"
    assert printable("a\nb\x1b[2Jc\u2028") == r"a\nb\x1b[2Jc\u2028"
    assert printable("x" * 1000, limit=10) == "x" * 10 + "..."


def test_a_server_that_never_answers_cannot_hold_the_doctor_past_max_seconds(
    hanging: str,
) -> None:
    # Each check alone may take 30 s; the whole run is bounded by 1 s, so no check may take
    # more than what is left of it.
    options = DoctorOptions(samples=12, checks_per_connection=4, timeout_s=30.0, max_seconds=1.0)
    started = time.monotonic()
    findings: Any = diagnose(hanging, options)
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed  # 30 s per check without the bound
    assert findings.connections and all(
        connection.error is not None and "DEADLINE_EXCEEDED" in connection.error
        for connection in findings.connections
    ), findings.connections
