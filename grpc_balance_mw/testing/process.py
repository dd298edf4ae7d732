"""Child processes of the local cluster: each in its own session, always stopped and reaped.

Every process the harness starts goes through :class:`ChildProcess`, which records it in a
registry until it is reaped, so a test can check that nothing leaked.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from grpc_balance_mw.errors import BalanceError

__all__ = [
    "ChildProcess",
    "ClusterError",
    "live_children",
    "python_module",
    "reserve_port",
    "wait_until",
]

_LIVE: dict[int, ChildProcess] = {}
_LIVE_LOCK = threading.Lock()


class ClusterError(BalanceError, RuntimeError):
    """The local cluster could not start or drive one of its parts."""


@atexit.register
def _stop_leftovers() -> None:
    """A harness that was never stopped (a crashed test run) still takes its children along."""
    for child in live_children():
        child.stop(grace_s=0.5)


def live_children() -> list[ChildProcess]:
    """Processes the harness started and has not reaped yet (a leak check wants none)."""
    with _LIVE_LOCK:
        return list(_LIVE.values())


class ChildProcess:
    """One process: started in a new session, stdout line-readable, stderr logged to a file.

    Args:
        argv: the command.
        name: what error messages call it, and the name of its log file.
        log_dir: where ``<name>.log`` (its stderr) goes.
        control: keep stdin open so :meth:`request` can send it lines.
        env: its environment (None: this process's).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_dir: Path,
        control: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._control = control
        self._popen: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<ChildProcess {self.name} pid={self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> ChildProcess:
        if self.alive:
            raise ClusterError(f"{self.name} is already running")
        self._buffer = b""
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if self._control else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                env=self.env,
            )
        with _LIVE_LOCK:
            _LIVE[self._popen.pid] = self
        return self

    def read_line(self, timeout: float) -> str:
        """The next line the process prints; raises if it exits or stays silent."""
        popen = self._require()
        assert popen.stdout is not None
        fd = popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(f"{self.name}: no output in {timeout}s{self.log_excerpt()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                popen.wait(timeout=5)
                raise ClusterError(
                    f"{self.name} exited with {popen.returncode}{self.log_excerpt()}"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().strip()

    def wait_ready(self, timeout: float = 15.0) -> int:
        """Wait for the ``READY <port>`` line the harness's own processes print; the port."""
        line = self.read_line(timeout)
        word, _, port = line.partition(" ")
        if word != "READY" or not port.isdigit():
            raise ClusterError(f"{self.name}: expected 'READY <port>', got {line!r}")
        return int(port)

    def request(self, line: str, timeout: float = 10.0) -> str:
        """Send one control line on stdin and return the one-line answer."""
        popen = self._require()
        if popen.stdin is None:
            raise ClusterError(f"{self.name} was not started with a control channel")
        try:
            popen.stdin.write(line.encode() + b"\n")
            popen.stdin.flush()
        except BrokenPipeError as exc:
            raise ClusterError(f"{self.name} is gone{self.log_excerpt()}") from exc
        answer = self.read_line(timeout)
        if not answer.startswith("OK"):
            raise ClusterError(f"{self.name} refused {line!r}: {answer}")
        return answer

    def send_signal(self, signum: int) -> None:
        popen = self._require()
        if popen.poll() is None:
            popen.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL and reap: when this returns the process is gone."""
        self.stop(grace_s=0.0)

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, SIGKILL after ``grace_s``, reap. Idempotent."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            if grace_s > 0:
                popen.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=grace_s)
            if popen.poll() is None:
                popen.kill()
            popen.wait()
        for pipe in (popen.stdin, popen.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        with _LIVE_LOCK:
            _LIVE.pop(popen.pid, None)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_excerpt(self) -> str:
        tail = self.log_tail()
        return f"; its log ends:\n{tail}" if tail else ""

    def _require(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise ClusterError(f"{self.name} was never started")
        return self._popen


class ProcessFrontend:
    """What a Service, DNS server or L7 proxy that runs as one child process shares.

    Subclasses start ``_process`` and set ``_port`` in ``start()``.
    """

    _process: ChildProcess | None

    def __init__(self, host: str) -> None:
        self._host = host
        self._port = 0
        self._process = None

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(grace_s=1.0)


def python_module(module: str, *args: str) -> list[str]:
    """The argv that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def reserve_port(host: str, *, avoid: int = 0, kind: int = socket.SOCK_STREAM) -> int:
    """A port free on ``host`` now (closed again, so a child can bind it; callers retry)."""
    while True:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if port != avoid:
            return port


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.02
) -> None:
    """Poll ``predicate()`` until true; ClusterError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
