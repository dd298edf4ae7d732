"""nginx as a second L7 proxy (``grpc_pass``), beside HAProxy: per-request balancing, h2 both ways.

The harness runs its own ``nginx -c <its config> -p <its dir>`` in the foreground, never the
system's. nginx has no runtime API for upstream servers (that is nginx Plus), so an endpoint
change rewrites the config and reloads (SIGHUP): new workers take new connections, old ones
finish the calls they have and close, and the client reconnects, as behind an Envoy whose
cluster changed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
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

__all__ = ["NginxL7", "nginx_path"]

Balance = Literal["least_conn", "round_robin"]


def nginx_path() -> str | None:
    """Where nginx is (it lives in sbin, which a user's PATH may lack)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


class NginxL7(ProcessFrontend):
    """nginx ``grpc_pass`` to the ready pods, balancing each call (``least_conn`` by default).

    Args:
        log_dir: where its config, pid file, temp dirs and log go.
        balance: ``least_conn`` or ``round_robin`` (nginx's default).
        avoid_port: a port its own must differ from (the pods' target port).
        host: the address it listens on.
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        balance: Balance = "least_conn",
        avoid_port: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(host)
        self.balance = balance
        self._avoid = avoid_port
        self._dir = log_dir / "nginx"
        self._config = self._dir / "nginx.conf"
        self._endpoints: list[Endpoint] = []
        self._generation = 0

    def __repr__(self) -> str:
        return f"<NginxL7 {self.address} {len(self._endpoints)} ready, {self.balance}>"

    def start(self, endpoints: Sequence[Endpoint]) -> None:
        binary = nginx_path()
        if binary is None:
            raise ClusterError("nginx is not installed (Debian: nginx-light)")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._endpoints = sorted(endpoints)
        for _ in range(5):
            self._port = reserve_port(self._host, avoid=self._avoid)
            self._config.write_text(self.render_config())
            process = ChildProcess(
                [binary, "-c", str(self._config), "-p", str(self._dir), "-e", "stderr"],
                name="nginx-l7",
                log_dir=self._dir,
            ).start()
            self._process = process
            try:
                wait_until("nginx to listen", self._listening, timeout=10.0)
            except ClusterError:
                if process.alive:
                    raise
                process.stop()  # most likely the port was taken meanwhile: draw another
                continue
            return
        raise ClusterError(f"nginx would not start; see {self._dir}")

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        wanted = sorted(endpoints)
        if wanted == self._endpoints:
            return
        if self._process is None or not self._process.alive:
            raise ClusterError("nginx is not running")
        self._endpoints = wanted
        self._config.write_text(self.render_config())
        before = self._worker_generation()
        self._process.send_signal(signal.SIGHUP)
        # Applied once the old workers are gone: until then a client's open connection still
        # reaches the old upstream set. They close idle connections at once (an h2 GOAWAY) and
        # busy ones after worker_shutdown_timeout.
        wait_until(
            "nginx to reload",
            lambda: bool(self._worker_generation()) and not before & self._worker_generation(),
            timeout=10.0,
        )

    def render_config(self) -> str:
        self._generation += 1
        method = "    least_conn;\n" if self.balance == "least_conn" else ""
        servers = "".join(
            f"    server {endpoint.ip}:{endpoint.port} max_fails=1 fail_timeout=1s;\n"
            for endpoint in self._endpoints
        )
        if not servers:  # an upstream needs a server; a Service without endpoints refuses
            servers = "    server 127.0.0.1:1 down;\n"
        temp = "\n".join(
            f"    {kind}_temp_path {self._dir}/tmp-{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""\
# generation {self._generation}
worker_processes 1;
daemon off;
master_process on;
pid {self._dir}/nginx.pid;
error_log stderr warn;
worker_shutdown_timeout 2s;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    upstream pods {{
{method}{servers}        keepalive 32;
    }}
    server {{
        listen {self._host}:{self._port} http2;
        http2_max_concurrent_streams 1024;
        location / {{
            grpc_pass grpc://pods;
            grpc_next_upstream error timeout;
            grpc_read_timeout 1h;
            grpc_send_timeout 1h;
        }}
    }}
}}
"""

    def _worker_generation(self) -> frozenset[int]:
        """The pids of nginx's current worker processes (children of its master)."""
        master = self.pid
        if master is None:
            return frozenset()
        workers = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 1 and fields[1] == str(master) and fields[0] != "Z":
                workers.add(int(entry))
        return frozenset(workers)

    def _listening(self) -> bool:
        if self._process is None or not self._process.alive:
            raise ClusterError(f"nginx exited{self._log()}")
        try:
            with socket.create_connection((self._host, self._port), timeout=0.2):
                pass
        except OSError:
            return False
        return bool(self._worker_generation())

    def _log(self) -> str:
        tail = self._process.log_tail() if self._process is not None else ""
        return f"; its log ends:\n{tail}" if tail else ""

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop(grace_s=1.0)
            # the master takes its workers along on SIGTERM; give them a moment to go
            deadline = time.monotonic() + 2.0
            while self._worker_generation() and time.monotonic() < deadline:
                time.sleep(0.02)
