"""Pods of the local cluster: real servers, one process each.

A pod is bound to its own loopback IP on the cluster's shared target port, so a headless
Service can list it as an A record, as a real pod IP would be. What it runs is its program:
the harness's charge-points server (:mod:`grpc_balance_mw.testing.charge_points.pod`, the
default), the user's servicer inside :mod:`grpc_balance_mw.testing.user_pod`
(:class:`ServicerProgram`), or the user's own command (:class:`CommandProgram`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import grpc

from grpc_balance_mw.identity import POD_HEADER
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2 as admin_pb
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2_grpc as admin_grpc
from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.process import (
    ChildProcess,
    ClusterError,
    python_module,
    reserve_port,
)

__all__ = ["CommandProgram", "Overflow", "Pod", "PodProgram", "PodSettings", "ServicerProgram"]

Overflow = Literal["queue", "reject"]
_ADMIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PodSettings:
    """How a pod serves: service time per call, capacity, what happens beyond it, and the
    server-side connection age (gRFC A9; None: connections live as long as the client keeps
    them)."""

    service_time_ms: float = 0.0
    max_concurrent: int = 0
    overflow: Overflow = "queue"
    max_connection_age_s: float | None = None
    #: The response header the pod names itself in; None: it stamps no identity at all (a
    #: fleet before it adopts the server half).
    identity_header: str | None = POD_HEADER
    #: A status name (``"UNAVAILABLE"``, ``"INTERNAL"``...): every call fails with it while the
    #: pod's health says SERVING (a gray failure); None: calls succeed.
    fail_with: str | None = None

    def args(self) -> list[str]:
        args = [
            "--service-time-ms",
            str(self.service_time_ms),
            "--max-concurrent",
            str(self.max_concurrent),
            "--overflow",
            self.overflow,
        ]
        if self.max_connection_age_s is not None:
            args += ["--max-connection-age-s", str(self.max_connection_age_s)]
        if self.identity_header != POD_HEADER:
            args += ["--identity-header", self.identity_header or ""]
        if self.fail_with is not None:
            args += ["--fail-with", self.fail_with]
        return args


@dataclass(frozen=True)
class ServicerProgram:
    """Run the user's servicer: ``register`` is a ``module:function`` reference, imported in the
    pod process (see :mod:`grpc_balance_mw.testing.user_pod`)."""

    register: str


@dataclass(frozen=True)
class CommandProgram:
    """Run the user's command as the pod. ``{port}``, ``{ip}``, ``{name}``, ``{namespace}``
    and ``{bind}`` (``ip:port``) in ``argv`` are filled in; the environment carries the same
    as ``PORT``, ``POD_IP``, ``POD_NAME``, ``POD_NAMESPACE``. It is ready once its port accepts
    a TCP connection, within ``ready_timeout_s``."""

    argv: tuple[str, ...]
    ready_timeout_s: float = 20.0


#: None: the harness's own charge-points server.
PodProgram = ServicerProgram | CommandProgram | None

#: Run inside the pod's network namespace when the harness cannot connect from here.
_CONNECT_LOOP = """
import socket, sys, time
ip, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        socket.create_connection((ip, port), timeout=1.0).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
"""


class Pod:
    """One pod process. ``port`` 0 lets the first pod pick the cluster's target port.

    Args:
        name: the pod name it stamps in ``x-balance-pod``.
        ip: its own loopback IP (or an IP inside a network namespace).
        port: the target port; 0 picks one.
        namespace: the Kubernetes namespace it reports.
        settings: service time and capacity.
        log_dir: where its stderr goes.
        launcher: a prefix for its command, e.g. ``ip netns exec NS``.
        program: what it runs (None: the charge-points server).
    """

    def __init__(
        self,
        name: str,
        ip: str,
        port: int,
        *,
        namespace: str,
        settings: PodSettings,
        log_dir: Path,
        launcher: Sequence[str] = (),
        program: PodProgram = None,
    ) -> None:
        self.name = name
        self.program = program
        self.ip = ip
        self.port = port
        self.namespace = namespace
        self.settings = settings
        self.serving = False
        self._log_dir = log_dir
        self._launcher = list(launcher)
        #: Where the harness reaches the pod's admin service, when not at :attr:`address` (a pod
        #: inside a network namespace is reached through a bridge).
        self.admin_address: str | None = None
        self._process: ChildProcess | None = None
        self._admin_channel: grpc.Channel | None = None

    def __repr__(self) -> str:
        state = ("serving" if self.serving else "not serving") if self.alive else "dead"
        return f"<Pod {self.name} {self.address} pid={self.pid} {state}>"

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.name, self.ip, self.port)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.alive

    @property
    def ready(self) -> bool:
        """What an Endpoints controller sees: alive and health SERVING."""
        return self.alive and self.serving

    def launch(self) -> None:
        """Start the process without waiting; :meth:`wait_ready` finishes the start."""
        if isinstance(self.program, CommandProgram):
            self._launch_command(self.program)
            return
        common = [
            *("--pod-name", self.name, "--pod-ip", self.ip, "--namespace", self.namespace),
            *("--bind", self.address, "--stop-on-stdin-eof"),
        ]
        env = None
        if isinstance(self.program, ServicerProgram):
            age = self.settings.max_connection_age_s
            args = ["--register", self.program.register, *common]
            args += [] if age is None else ["--max-connection-age-s", str(age)]
            argv = python_module("grpc_balance_mw.testing.user_pod", *args)
            # The child imports the reference: give it every path this process imports from.
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        else:
            args = [*common, "--shutdown-grace-s", "0.5", *self.settings.args()]
            argv = python_module("grpc_balance_mw.testing.charge_points.pod", *args)
        self._process = ChildProcess(
            [*self._launcher, *argv], name=self.name, log_dir=self._log_dir, control=True, env=env
        ).start()

    def _launch_command(self, program: CommandProgram) -> None:
        if self.port == 0:
            self.port = reserve_port(self.ip)
        fields = {
            "port": str(self.port),
            "ip": self.ip,
            "name": self.name,
            "namespace": self.namespace,
            "bind": self.address,
        }
        try:
            argv = [arg.format(**fields) for arg in program.argv]
        except (KeyError, IndexError, ValueError) as exc:
            raise ClusterError(f"pod_command has a placeholder the harness lacks: {exc}") from exc
        env = {
            **os.environ,
            "PORT": fields["port"],
            "POD_IP": self.ip,
            "POD_NAME": self.name,
            "POD_NAMESPACE": self.namespace,
        }
        self._process = ChildProcess(
            [*self._launcher, *argv], name=self.name, log_dir=self._log_dir, env=env
        ).start()

    def _wait_command_ready(self, process: ChildProcess, timeout: float) -> None:
        """Until the command's port accepts a connection; ClusterError if it exits or not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.alive:
                raise ClusterError(
                    f"{self.name} exited before it listened on {self.address}"
                    f"{process.log_excerpt()}"
                )
            if self._accepts(min(1.0, max(0.05, deadline - time.monotonic()))):
                return
            time.sleep(0.05)
        raise ClusterError(
            f"{self.name} did not accept connections on {self.address} in {timeout}s"
            f"{process.log_excerpt()}"
        )

    def _accepts(self, timeout: float) -> bool:
        if self._launcher:  # its IP is inside a namespace: connect from there
            check = [*self._launcher, sys.executable, "-c", _CONNECT_LOOP, self.ip]
            try:
                done = subprocess.run(
                    [*check, str(self.port), str(timeout)],
                    timeout=timeout + 10,
                    capture_output=True,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return False
            return done.returncode == 0
        try:
            socket.create_connection((self.ip, self.port), timeout=timeout).close()
        except OSError:
            return False
        return True

    def wait_ready(self, timeout: float = 20.0) -> None:
        if self._process is None:
            raise ClusterError(f"{self.name} was never launched")
        if isinstance(self.program, CommandProgram):
            self._wait_command_ready(self._process, self.program.ready_timeout_s)
            self.serving = True
            return
        port = self._process.wait_ready(timeout)
        if self.port not in (0, port):
            raise ClusterError(f"{self.name} bound port {port}, not {self.port}")
        self.port = port
        self.serving = True

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def kill(self) -> None:
        """SIGKILL: no goodbye on its connections, as when a node dies or OOM strikes."""
        self._close_admin()
        if self._process is not None:
            self._process.kill()
        self.serving = False

    def pause(self) -> None:
        """SIGSTOP: the pod hangs (its kernel still accepts connections; nothing answers, not
        even health checks), as a pod stuck in a deadlock or a long GC pause."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: a paused pod runs on where it stopped."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (:meth:`stop` then waits), to stop many pods at once."""
        if self._process is not None and self._process.alive:
            self._process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM (health NOT_SERVING, then a graceful stop), SIGKILL if it lingers."""
        self._close_admin()
        if self._process is not None:
            self._process.stop(grace_s=3.0)
        self.serving = False

    def stats(self, *, reset: bool = False) -> admin_pb.PodStats:
        """Its own count of what it served (``PodAdmin.GetStats``)."""
        self._require_admin("counts")
        stats: admin_pb.PodStats = self._admin().GetStats(
            admin_pb.GetStatsRequest(reset=reset), timeout=_ADMIN_TIMEOUT_S
        )
        return stats

    def set_serving(self, serving: bool) -> None:
        self._require_admin("health")
        self._admin().SetServing(
            admin_pb.SetServingRequest(serving=serving), timeout=_ADMIN_TIMEOUT_S
        )
        self.serving = serving

    def configure(
        self, *, service_time_ms: float | None = None, max_concurrent: int | None = None
    ) -> None:
        """Change service time or capacity on the running pod (None: leave as is)."""
        if self.program is not None:
            raise ClusterError(
                f"{self.name} runs the user's program: service time and capacity are its own"
            )
        request = admin_pb.ConfigureRequest(
            service_time_ms=-1 if service_time_ms is None else round(service_time_ms),
            max_concurrent=-1 if max_concurrent is None else max_concurrent,
        )
        self._admin().Configure(request, timeout=_ADMIN_TIMEOUT_S)
        self.settings = replace(
            self.settings,
            service_time_ms=(
                self.settings.service_time_ms if service_time_ms is None else service_time_ms
            ),
            max_concurrent=self.settings.max_concurrent
            if max_concurrent is None
            else max_concurrent,
        )

    def _require_admin(self, what: str) -> None:
        if isinstance(self.program, CommandProgram):
            raise ClusterError(
                f"{self.name} runs pod_command, which the harness has no {what} of: count "
                "the pod identity (x-balance-pod) in the responses instead"
            )

    def _admin(self) -> admin_grpc.PodAdminStub:
        if not self.alive:
            raise ClusterError(f"{self.name} is not running")
        if self._admin_channel is None:
            # Its own connection: never shares one with the channels under test.
            self._admin_channel = grpc.insecure_channel(
                self.admin_address or self.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
        return admin_grpc.PodAdminStub(self._admin_channel)

    def _close_admin(self) -> None:
        if self._admin_channel is not None:
            self._admin_channel.close()
            self._admin_channel = None
