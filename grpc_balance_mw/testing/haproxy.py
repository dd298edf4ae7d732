"""HAProxy as the ``haproxy`` L4 Service (``mode tcp``) and as the L7 sidecar (``mode http``, h2).

The harness runs its own ``haproxy -f <its config> -db``, never the system's. The backend has a
fixed number of server slots, all in maintenance at first; the runtime API on a private stats
socket points a slot at an endpoint and takes it in or out of maintenance. That keeps established
connections to live pods open across scale events, as kube-proxy keeps conntrack flows, and
``check`` marks a dead pod DOWN on its own even between updates.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.process import (
    ChildProcess,
    ClusterError,
    ProcessFrontend,
    reserve_port,
    wait_until,
)

__all__ = ["HAProxy", "HAProxyL7", "HAProxyService", "haproxy_path"]

Mode = Literal["tcp", "http"]
_BACKEND = "pods"


def haproxy_path() -> str | None:
    """Where haproxy is (it lives in sbin, which a user's PATH may lack)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


class HAProxy(ProcessFrontend):
    """One HAProxy process with one frontend and one backend of ``slots`` servers.

    Args:
        log_dir: where its config, stats socket and log go.
        mode: ``tcp`` (an L4 Service) or ``http`` (an L7 gRPC proxy, h2 on both sides).
        balance: the HAProxy ``balance`` algorithm.
        slots: the most endpoints it can hold at once.
        avoid_port: a port its own must differ from (the pods' target port).
        host: the address it listens on.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        mode: Mode,
        balance: str,
        slots: int = 32,
        avoid_port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host)
        self.mode = mode
        self.balance = balance
        self._slots: list[Endpoint | None] = [None] * slots
        self._avoid = avoid_port
        self._dir = log_dir
        self._name = f"haproxy-{'service' if mode == 'tcp' else 'l7'}"
        self._socket = log_dir / f"{self._name}.sock"

    def __repr__(self) -> str:
        active = sum(slot is not None for slot in self._slots)
        return f"<HAProxy mode={self.mode} balance={self.balance} {self.address} {active} ready>"

    def start(self, endpoints: Sequence[Endpoint]) -> None:
        binary = haproxy_path()
        if binary is None:
            raise ClusterError("haproxy is not installed (Debian: haproxy)")
        for _ in range(5):
            self._port = reserve_port(self._host, avoid=self._avoid)
            config = self._dir / f"{self._name}.cfg"
            config.write_text(self.render_config())
            process = ChildProcess(
                [binary, "-f", str(config), "-db"], name=self._name, log_dir=self._dir
            ).start()
            self._process = process
            try:
                wait_until(f"{self._name} to listen", self._listening, timeout=10.0)
            except ClusterError:
                if process.alive:
                    raise
                process.stop()  # most likely the port was taken meanwhile: draw another
                continue
            # Slots start in runtime maintenance (not config ``disabled``, which ``set server
            # state ready`` cannot lift in HAProxy 2.6).
            for index in range(len(self._slots)):
                self._admin(f"set server {_BACKEND}/s{index} state maint")
            self.update(endpoints)
            return
        raise ClusterError(f"{self._name} would not start; see {self._dir}")

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        wanted = {endpoint.address: endpoint for endpoint in endpoints}
        commands = []
        for index, slot in enumerate(self._slots):
            if slot is not None and slot.address not in wanted:
                # Maintenance, not removal: its established connections stay open.
                commands.append(f"set server {_BACKEND}/s{index} state maint")
                self._slots[index] = None
        held = {slot.address for slot in self._slots if slot is not None}
        for endpoint in endpoints:
            if endpoint.address in held:
                continue
            try:
                index = self._slots.index(None)
            except ValueError:
                raise ClusterError(f"{self._name} holds at most {len(self._slots)} pods") from None
            self._slots[index] = endpoint
            server = f"{_BACKEND}/s{index}"
            commands += [
                f"set server {server} addr {endpoint.ip} port {endpoint.port}",
                f"set server {server} state ready",
            ]
        for command in commands:
            self._admin(command)
        wait_until(f"{self._name} to see {sorted(wanted)} UP", self._all_up, timeout=10.0)

    def render_config(self) -> str:
        bind_proto = " proto h2" if self.mode == "http" else ""
        server_proto = " proto h2" if self.mode == "http" else ""
        servers = "\n".join(
            f"    server s{index} 127.0.0.1:1 check inter 200ms fall 1 rise 1{server_proto}"
            for index in range(len(self._slots))
        )
        return f"""\
global
    stats socket {self._socket} mode 600 level admin
    maxconn 4096

defaults
    mode {self.mode}
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend service
    bind {self._host}:{self._port}{bind_proto}
    default_backend {_BACKEND}

backend {_BACKEND}
    balance {self.balance}
{servers}
"""

    def _admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self._socket))
            sock.sendall(command.encode() + b"\n")
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        text = reply.decode(errors="replace").strip()
        if text.startswith(("No such", "Unknown", "Require", "Invalid")):
            raise ClusterError(f"{self._name} refused {command!r}: {text}")
        return text

    def _listening(self) -> bool:
        if self._process is None or not self._process.alive:
            raise ClusterError(f"{self._name} exited")
        try:
            with socket.create_connection((self._host, self._port), timeout=0.2):
                pass
            self._admin("show info")
        except OSError:
            return False
        return True

    def _all_up(self) -> bool:
        """True when exactly the held slots are UP (or, for a dead pod, found DOWN by check)."""
        states = self._admin("show servers state " + _BACKEND).splitlines()
        up = set()
        for line in states:
            fields = line.split()
            # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
            server_up, admin_ready = fields[5:6] == ["2"], fields[6:7] == ["0"]
            if fields[1:2] == [_BACKEND] and server_up and admin_ready:
                up.add(int(fields[3][1:]))
        held = {index for index, slot in enumerate(self._slots) if slot is not None}
        return up == held


class HAProxyService(HAProxy):
    """The ``haproxy`` L4 Service: ``mode tcp``, ``balance random``, one pod per connection."""

    def __init__(self, log_dir: Path, *, avoid_port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__(log_dir, mode="tcp", balance="random", avoid_port=avoid_port, host=host)


class HAProxyL7(HAProxy):
    """The L7 proxy standing in for an Envoy sidecar: h2 on both sides, per-call balancing."""

    def __init__(
        self,
        log_dir: Path,
        *,
        balance: Literal["leastconn", "roundrobin"] = "leastconn",
        avoid_port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(log_dir, mode="http", balance=balance, avoid_port=avoid_port, host=host)
