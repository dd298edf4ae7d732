"""Network namespaces for the local cluster: kube-proxy's rules live in one, never on the host.

A :class:`NetworkNamespace` is created with its own loopback, a route for the Service CIDR, and its
own (empty) iptables tables. Processes started in it (pods) are tracked and killed by pid when it
closes. Code in the host namespace reaches addresses inside it through a :class:`Bridge`: one
namespace-side TCP connection per accepted host connection, so a per-connection pick made inside
(kube-proxy's ``statistic`` rule) is seen by the host client exactly as it was made.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType

from grpc_balance_mw.errors import BalanceError

__all__ = [
    "NAME_PREFIX",
    "SERVICE_CIDR",
    "Bridge",
    "NamespaceError",
    "NetworkNamespace",
    "list_namespaces",
    "live_namespaces",
    "privileged",
    "read_line",
]

#: Every namespace this package creates is named ``gbm-<random>``, so a leak check can find them.
NAME_PREFIX = "gbm-"
#: kube-apiserver's default ``--service-cluster-ip-range``.
SERVICE_CIDR = "10.96.0.0/12"
_COMMAND_TIMEOUT_S = 10.0
_STOP_GRACE_S = 2.0

_LIVE: dict[str, NetworkNamespace] = {}
_LIVE_LOCK = threading.Lock()


class NamespaceError(BalanceError, RuntimeError):
    """A namespace could not be created or driven, or a command inside it failed."""


def list_namespaces() -> list[str]:
    """Names of all network namespaces on the machine that this package's naming marks as ours."""
    result = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S
    )
    names = (line.split()[0] for line in result.stdout.splitlines() if line.strip())
    return sorted(name for name in names if name.startswith(NAME_PREFIX))


def live_namespaces() -> list[str]:
    """Namespaces this process created and has not closed yet (a leak check wants none)."""
    with _LIVE_LOCK:
        return sorted(_LIVE)


class NetworkNamespace:
    """A network namespace of our own; a context manager, closed (deleted) idempotently.

    Args:
        service_cidr: routed to ``lo`` with source 127.0.0.1, so a ClusterIP in it is a local
            destination that kube-proxy's OUTPUT DNAT can rewrite to a pod on 127.x. No
            ``route_localnet`` is needed: the packets are local and never arrive from outside.

    Processes started some other way (``exec_prefix`` in another launcher) must be stopped by
    whoever started them before :meth:`close`, or they keep the namespace alive unnamed.
    """

    def __init__(self, service_cidr: str = SERVICE_CIDR) -> None:
        self.name = NAME_PREFIX + secrets.token_hex(4)
        self.service_cidr = service_cidr
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        self._closed = False
        _ip("netns", "add", self.name)
        with _LIVE_LOCK:
            _LIVE[self.name] = self
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "route", "add", service_cidr, "dev", "lo", "src", "127.0.0.1")
        except NamespaceError:
            self.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._processes)} processes"
        return f"<NetworkNamespace {self.name} {state}>"

    def __enter__(self) -> NetworkNamespace:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, argv: Sequence[str], *, input: str | None = None) -> str:
        """Run a command inside the namespace to completion; its stdout, or NamespaceError."""
        self._check_open()
        return _run([*self.exec_prefix, *argv], input=input)

    def spawn(
        self, argv: Sequence[str], *, pass_fds: Sequence[int] = (), stdin_pipe: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the namespace, tracked until :meth:`close`.

        Args:
            argv: the command (without the ``ip netns exec`` prefix).
            pass_fds: file descriptors it inherits (a host-side listening socket).
            stdin_pipe: give it a stdin pipe whose EOF tells it that we are gone.

        Returns:
            The process; its stdout is a pipe, its stderr goes to ours. ``ip netns exec`` execs
            the command, so the pid is the command's own.
        """
        self._check_open()
        process = subprocess.Popen(
            [*self.exec_prefix, *argv],
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
        with self._lock:
            self._processes[process.pid] = process
        return process

    def stop_process(
        self, process: subprocess.Popen[bytes], grace_s: float = _STOP_GRACE_S
    ) -> None:
        """SIGTERM, then SIGKILL after ``grace_s`` (0: SIGKILL at once); reaped when it returns."""
        if process.poll() is None:
            if grace_s > 0:
                process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=grace_s)
            if process.poll() is None:
                process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        with self._lock:
            self._processes.pop(process.pid, None)

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Processes started here and not yet stopped."""
        with self._lock:
            return list(self._processes.values())

    def pids(self) -> list[int]:
        """Every process the kernel sees in this namespace (ours or not), for leak checks."""
        self._check_open()
        out = _run(["ip", "netns", "pids", self.name])
        return [int(word) for word in out.split()]

    def bridge(self, address: str, listen: tuple[str, int] = ("127.0.0.1", 0)) -> Bridge:
        """A host-side ``listen`` address (default ``127.0.0.1:PORT``) whose connections are
        forwarded to ``address`` inside."""
        return Bridge(self, address, listen=listen)

    def close(self) -> None:
        """Kill what we started (by pid), then delete the namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for process in self.processes():
            self.stop_process(process, grace_s=0.0)
        try:
            _ip("netns", "del", self.name)
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(self.name, None)

    def _check_open(self) -> None:
        if self._closed:
            raise NamespaceError(f"namespace {self.name} is closed")


class Bridge:
    """Host ``127.0.0.1:PORT`` -> ``address`` inside a namespace, one connection for one.

    The listening socket is bound here, in the host namespace, and handed to a forwarder process
    (:mod:`grpc_balance_mw.testing.ns_bridge`) that runs inside the namespace: it accepts on the
    host socket and connects inside. The port is known, and connectable, before the forwarder runs.
    ``listen`` may be the inside address itself (a loopback IP is free on the host while a pod
    holds it inside): the host then reaches the pod at the pod's own address, as a routed
    cluster network would let it.
    """

    def __init__(
        self,
        netns: NetworkNamespace,
        address: str,
        ready_timeout_s: float = 15.0,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        self.netns = netns
        self.address = address
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(listen)
            except OSError as exc:
                raise NamespaceError(
                    f"bridge to {address} in {netns.name}: cannot listen on {listen}: {exc}"
                ) from exc
            listener.listen(128)
            self.host: str = listener.getsockname()[0]
            self.port: int = listener.getsockname()[1]
            self._process = netns.spawn(
                [
                    sys.executable,
                    "-m",
                    "grpc_balance_mw.testing.ns_bridge",
                    "--listen-fd",
                    str(listener.fileno()),
                    "--connect",
                    address,
                ],
                pass_fds=[listener.fileno()],
                stdin_pipe=True,
            )
        finally:
            # The forwarder holds its own copy; ours would only keep the port open after it dies.
            listener.close()
        try:
            line = read_line(self._process, ready_timeout_s)
        except NamespaceError:
            self.close()
            raise
        if line != "READY":
            self.close()
            raise NamespaceError(f"bridge to {address} in {netns.name}: unexpected {line!r}")

    def __repr__(self) -> str:
        return f"<Bridge {self.target} -> {self.netns.name}/{self.address}>"

    @property
    def target(self) -> str:
        """Where host code connects: ``HOST:PORT`` (default ``127.0.0.1:PORT``)."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """The forwarder's pid."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def close(self) -> None:
        """Stop the forwarder (its open connections go with it). Idempotent."""
        self.netns.stop_process(self._process)


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``process`` prints, without blocking past ``timeout``."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NamespaceError(f"pid {process.pid}: no output in {timeout}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        # Read byte by byte so nothing after the first line is taken from the pipe.
        chunk = os.read(fd, 1)
        if not chunk:
            raise NamespaceError(f"pid {process.pid} exited with {process.wait(timeout=5)}")
        buffer += chunk
    return buffer.decode().strip()


@functools.cache
def privileged() -> str | None:
    """Why namespaces with kube-proxy's rules cannot run here, or ``None`` when they can.

    Tries the real thing once per process: a namespace, and an ``iptables-restore`` that uses the
    matches kube-proxy needs (``statistic``, ``recent``, ``conntrack``, DNAT, REJECT).
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces and iptables need root"
    for tool in ("ip", "iptables-restore", "iptables-save"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = "\n".join(
        [
            "*filter",
            "-A OUTPUT -m conntrack --ctstate NEW -d 10.96.0.1/32 -p tcp -j REJECT"
            " --reject-with tcp-reset",
            "COMMIT",
            "*nat",
            "-A OUTPUT -d 10.96.0.2/32 -p tcp -m statistic --mode random --probability 0.5"
            " -m recent --name PROBE --rcheck --seconds 10 --reap -j DNAT"
            " --to-destination 127.0.0.1:1",
            "-A OUTPUT -d 10.96.0.2/32 -p tcp -m recent --name PROBE --set -j DNAT"
            " --to-destination 127.0.0.1:1",
            "COMMIT",
            "",
        ]
    )
    try:
        with NetworkNamespace() as netns:
            netns.run(["iptables-restore"], input=probe)
    except (NamespaceError, OSError) as exc:
        return f"cannot run kube-proxy's iptables rules in a network namespace: {exc}"
    return None


def _run(argv: Sequence[str], *, input: str | None = None) -> str:
    try:
        result = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NamespaceError(f"{' '.join(argv)}: {exc}") from exc
    if result.returncode != 0:
        raise NamespaceError(
            f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _ip(*args: str) -> None:
    _run(["ip", *args])


@atexit.register
def _close_leftovers() -> None:
    # A test that forgot close() must not leave a namespace (and its pods) on the machine.
    for name in live_namespaces():
        with _LIVE_LOCK:
            netns = _LIVE.get(name)
        if netns is not None:
            with contextlib.suppress(NamespaceError):
                netns.close()
