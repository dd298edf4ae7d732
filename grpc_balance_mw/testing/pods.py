"""Pods of the local cluster: real charge-points servers, one process each.

A pod is :mod:`grpc_balance_mw.testing.charge_points.pod` bound to its own loopback IP on the
cluster's shared target port, so a headless Service can list it as an A record, as a real pod
IP would be.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2 as admin_pb
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2_grpc as admin_grpc
from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.process import ChildProcess, ClusterError, python_module

__all__ = ["Overflow", "Pod", "PodSettings"]

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
        return args


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
    ) -> None:
        self.name = name
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
        argv = [
            *self._launcher,
            *python_module(
                "grpc_balance_mw.testing.charge_points.pod",
                "--pod-name",
                self.name,
                "--pod-ip",
                self.ip,
                "--namespace",
                self.namespace,
                "--bind",
                self.address,
                "--shutdown-grace-s",
                "0.5",
                "--stop-on-stdin-eof",
                *self.settings.args(),
            ),
        ]
        self._process = ChildProcess(
            argv, name=self.name, log_dir=self._log_dir, control=True
        ).start()

    def wait_ready(self, timeout: float = 20.0) -> None:
        if self._process is None:
            raise ClusterError(f"{self.name} was never launched")
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
        stats: admin_pb.PodStats = self._admin().GetStats(
            admin_pb.GetStatsRequest(reset=reset), timeout=_ADMIN_TIMEOUT_S
        )
        return stats

    def set_serving(self, serving: bool) -> None:
        self._admin().SetServing(
            admin_pb.SetServingRequest(serving=serving), timeout=_ADMIN_TIMEOUT_S
        )
        self.serving = serving

    def configure(
        self, *, service_time_ms: float | None = None, max_concurrent: int | None = None
    ) -> None:
        """Change service time or capacity on the running pod (None: leave as is)."""
        request = admin_pb.ConfigureRequest(
            service_time_ms=-1 if service_time_ms is None else round(service_time_ms),
            max_concurrent=-1 if max_concurrent is None else max_concurrent,
        )
        self._admin().Configure(request, timeout=_ADMIN_TIMEOUT_S)
        self.settings = PodSettings(
            self.settings.service_time_ms if service_time_ms is None else service_time_ms,
            self.settings.max_concurrent if max_concurrent is None else max_concurrent,
            self.settings.overflow,
            self.settings.max_connection_age_s,
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
