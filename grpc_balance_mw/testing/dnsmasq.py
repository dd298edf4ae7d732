"""The ``dnsmasq`` cluster DNS: real dnsmasq serving a headless Service from a hosts file.

The harness runs dnsmasq as its own process with its own flags (never the system's config):
``--port``, ``--listen-address``, ``--addn-hosts``; an update rewrites the hosts file and sends
SIGHUP, then waits until dnsmasq answers with the new set.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

from grpc_balance_mw.dns_message import lookup_a
from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.process import (
    ChildProcess,
    ClusterError,
    ProcessFrontend,
    reserve_port,
    wait_until,
)

__all__ = ["DnsmasqDNS", "dnsmasq_path"]


def dnsmasq_path() -> str | None:
    """Where dnsmasq is (it lives in sbin, which a user's PATH may lack)."""
    return shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")


class DnsmasqDNS(ProcessFrontend):
    """dnsmasq as the cluster DNS; same contract as :class:`EmbeddedDNS`.

    Args:
        log_dir: where its hosts file and log go.
        name: the headless Service's FQDN.
        ttl_s: ``--local-ttl`` of its answers.
        host: ``--listen-address``.
    """

    def __init__(
        self, log_dir: Path, *, name: str, ttl_s: int = 1, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(host)
        self.name = name
        self._ttl_s = ttl_s
        self._log_dir = log_dir
        self._hosts = log_dir / "dnsmasq.hosts"

    def __repr__(self) -> str:
        return f"<DnsmasqDNS {self.name} at {self.address}>"

    def start(self, endpoints: Sequence[Endpoint]) -> None:
        binary = dnsmasq_path()
        if binary is None:
            raise ClusterError("dnsmasq is not installed (Debian: dnsmasq-base)")
        self._write_hosts(endpoints)
        for _ in range(5):
            self._port = reserve_port(self._host)
            self._process = ChildProcess(
                self._argv(binary), name="dns-dnsmasq", log_dir=self._log_dir
            ).start()
            try:
                self._wait_for(endpoints)
                return
            except ClusterError:
                if self._process.alive:
                    raise
                self._process.stop()  # the port was taken meanwhile: draw another
        raise ClusterError(f"dnsmasq would not start; see {self._log_dir}")

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        if self._process is None:
            raise ClusterError("dnsmasq was never started")
        self._write_hosts(endpoints)
        self._process.send_signal(signal.SIGHUP)  # re-reads --addn-hosts
        self._wait_for(endpoints)

    def _argv(self, binary: str) -> list[str]:
        # Run as whoever we are, so it can read the hosts file in our private temp dir.
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        return [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            f"--user={user}",
            f"--group={group}",
            f"--port={self._port}",
            f"--listen-address={self._host}",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-negcache",
            f"--addn-hosts={self._hosts}",
            f"--local-ttl={self._ttl_s}",
            f"--local=/{self.name.split('.', 1)[-1]}/",
            "--pid-file=",
            "--log-facility=-",
        ]

    def _write_hosts(self, endpoints: Sequence[Endpoint]) -> None:
        lines = [f"{endpoint.ip} {self.name}\n" for endpoint in endpoints]
        tmp = self._hosts.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self._hosts)

    def _wait_for(self, endpoints: Sequence[Endpoint]) -> None:
        want = sorted({e.ip for e in endpoints}, key=lambda ip: tuple(map(int, ip.split("."))))
        process = self._process
        assert process is not None

        def answers_as_wanted() -> bool:
            if not process.alive:
                raise ClusterError(f"dnsmasq exited; its log ends:\n{process.log_tail()}")
            return lookup_a(self.address, self.name, timeout=0.2) == want

        wait_until(f"dnsmasq to answer {want}", answers_as_wanted, timeout=10.0)
