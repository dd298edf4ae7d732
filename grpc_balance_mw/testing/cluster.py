"""The local cluster: pods, an L4 Service, a cluster DNS and an L7 proxy, on this machine.

Usage::

    with LocalCluster(pods=3, service="haproxy", dns="dnsmasq") as cluster:
        channel = grpc.insecure_channel(cluster.service_target)
        ...
        assert cluster.served() == {"charge-points-0": 100, ...}

The pods run the harness's charge-points server unless given the user's own service: a
servicer (``servicer="myapp.testing:register"``, see :mod:`grpc_balance_mw.testing.user_pod`)
or a command (``pod_command=["python", "server.py", "--port", "{port}"]``); docs/testing.md.

Every part is a real process started by the harness and stopped by :meth:`LocalCluster.stop`.
The cluster is its own Endpoints controller: a pod is an endpoint while it is alive and its
health is SERVING, and each harness action (scale, kill, restart, set_serving) has been applied
to the Service, the DNS and the L7 proxy by the time it returns.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Literal

import grpc

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import POD_HEADER, check_pod_headers
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2 as admin_pb
from grpc_balance_mw.testing.dns_server import EmbeddedDNS
from grpc_balance_mw.testing.dnsmasq import DnsmasqDNS, dnsmasq_path
from grpc_balance_mw.testing.endpoints import Endpoint, Frontend
from grpc_balance_mw.testing.haproxy import HAProxyL7, HAProxyService, haproxy_path
from grpc_balance_mw.testing.kube_proxy import IptablesService
from grpc_balance_mw.testing.netns import Bridge, NamespaceError, NetworkNamespace, privileged
from grpc_balance_mw.testing.nginx import NginxL7, nginx_path
from grpc_balance_mw.testing.pods import (
    CommandProgram,
    Overflow,
    Pod,
    PodProgram,
    PodSettings,
    ServicerProgram,
)
from grpc_balance_mw.testing.process import ClusterError
from grpc_balance_mw.testing.user_pod import RegisterServicer, resolve_register
from grpc_balance_mw.testing.userspace_proxy import UserspaceService

__all__ = ["DNSKind", "L7Kind", "LocalCluster", "ServiceKind", "missing_components"]

ServiceKind = Literal["userspace", "haproxy", "iptables"]
DNSKind = Literal["embedded", "dnsmasq"]
AUTO: Literal["auto"] = "auto"
L7Kind = Literal["haproxy", "nginx"]
_MAX_PODS = 250  # one loopback /24 per cluster, .1 to .250
_PORT_ATTEMPTS = 4
#: The iptables backend's ClusterIP and Service port (the pods' target port is another).
CLUSTER_IP, SERVICE_PORT = "10.96.0.10", 80


def missing_components(
    service: ServiceKind = "userspace",
    dns: DNSKind | Literal["auto"] | None = None,
    l7: L7Kind | None = None,
) -> list[str]:
    """What this machine lacks for such a cluster, as readable reasons (empty: nothing)."""
    missing = []
    if (service == "haproxy" or l7 == "haproxy") and haproxy_path() is None:
        missing.append("haproxy is not installed (Debian package: haproxy)")
    if l7 == "nginx" and nginx_path() is None:
        missing.append("nginx is not installed (Debian package: nginx-light)")
    if dns == "dnsmasq" and dnsmasq_path() is None:
        missing.append("dnsmasq is not installed (Debian package: dnsmasq-base)")
    if service == "iptables":
        reason = privileged()
        if reason is not None:
            missing.append(reason)
    return missing


def servicer_reference(servicer: str | RegisterServicer) -> str:
    """The ``module:function`` form of a register function, checked to import here.

    A pod is another process, so the function must be importable there by name: a module-level
    function of an importable module, not a lambda, a nested function or ``__main__``'s.
    """
    if isinstance(servicer, str):
        reference = servicer
    else:
        module = getattr(servicer, "__module__", None)
        qualname = getattr(servicer, "__qualname__", None)
        if not module or not qualname or "<" in qualname or module == "__main__":
            raise ConfigurationError(
                f"servicer {servicer!r} cannot be imported in a pod process: pass a "
                "module-level function of an importable module, or a 'module:function' string"
            )
        reference = f"{module}:{qualname}"
    try:
        resolve_register(reference)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"servicer {reference!r} does not import: {exc}") from exc
    return reference


class LocalCluster:
    """A Kubernetes-like cluster on loopback for one Service of pods.

    Args:
        pods: how many pods to start with.
        service: the L4 ClusterIP Service: ``userspace`` (embedded proxy, the default),
            ``haproxy`` (``mode tcp``, ``balance random``) or ``iptables`` (kube-proxy's chains
            in a network namespace that the pods run in; needs root). With ``iptables`` each pod
            address is also reachable from the host, through a forwarder listening on the same
            IP and port here, so the DNS's A records and the L7 proxy's upstreams work as in a
            routed pod network.
        dns: the cluster DNS for the headless Service, or None for none (``auto``: embedded).
        l7: the L7 proxy standing in for an Envoy sidecar: ``haproxy`` (``mode http``, h2) or
            ``nginx`` (``grpc_pass``); None for none.
        l7_balance: its per-call algorithm.
        service_time_ms: how long each pod takes per call.
        max_concurrent: each pod's capacity (0: unlimited).
        overflow: beyond capacity, ``queue`` or ``reject`` (RESOURCE_EXHAUSTED).
        max_connection_age_s: each pod closes a connection after about this long (the
            server-side fix, gRFC A9, with gRPC's +/-10 % jitter); None: never.
        session_affinity: ``ClientIP`` pins a client to one pod (iptables backend only).
        namespace: the Kubernetes namespace the pods report.
        name: the Service name; pods are ``<name>-0``, ``<name>-1``, ...
        dns_ttl_s: the TTL of the DNS answers.
        servicer: run the user's service in each pod instead of charge-points: a
            ``register(server, pod)`` function (:class:`~grpc_balance_mw.testing.user_pod.
            RegisterServicer`) given as a ``"module:function"`` string or the function itself
            (module-level, so the pod process can import it). The harness adds the pod
            identity, health and a per-pod call count (:meth:`served`).
        pod_command: run this command as each pod instead (``{port}``, ``{ip}``, ``{name}``,
            ``{namespace}``, ``{bind}`` filled in; ``PORT``, ``POD_IP``, ``POD_NAME``,
            ``POD_NAMESPACE`` in its environment). It must stamp the identity itself; the
            harness has no counts (:meth:`served` raises) and cannot flip its health.
        pod_ready_timeout_s: how long a ``pod_command`` pod may take to accept connections.
        identity_header: the response header each pod names itself in (the harness's own
            pods): ``x-balance-pod`` (the server half's), another name (a fleet that sends its
            pod name in a header of its own, read with ``ObserveOptions(pod_headers=)``), or
            None: the pods stamp no identity at all, as servers without the server half.
        fail_with: pods, by ordinal (``{1: "UNAVAILABLE"}``: ``charge-points-1``), that fail
            every call with that status while their health says SERVING (a gray failure); a
            pod started later with that ordinal fails too. The harness's own pods only.
    """

    def __init__(
        self,
        pods: int = 3,
        *,
        service: ServiceKind = "userspace",
        dns: DNSKind | Literal["auto"] | None = AUTO,
        l7: L7Kind | None = None,
        l7_balance: Literal["leastconn", "roundrobin"] = "leastconn",
        service_time_ms: float = 0.0,
        max_concurrent: int = 0,
        overflow: Overflow = "queue",
        max_connection_age_s: float | None = None,
        session_affinity: Literal["ClientIP"] | None = None,
        namespace: str = "ev",
        name: str = "charge-points",
        dns_ttl_s: int = 1,
        servicer: str | RegisterServicer | None = None,
        pod_command: Sequence[str] | None = None,
        pod_ready_timeout_s: float = 20.0,
        identity_header: str | None = POD_HEADER,
        fail_with: Mapping[int, str] | None = None,
    ) -> None:
        if not 0 <= pods <= _MAX_PODS:
            raise ConfigurationError(f"pods must be between 0 and {_MAX_PODS}, got {pods}")
        if service not in ("userspace", "haproxy", "iptables"):
            raise ConfigurationError(f"unknown service implementation {service!r}")
        if dns == AUTO:
            dns = "embedded"
        if dns not in (None, "embedded", "dnsmasq"):
            raise ConfigurationError(f"unknown dns implementation {dns!r}")
        if l7 not in (None, "haproxy", "nginx"):
            raise ConfigurationError(f"unknown l7 proxy {l7!r}")
        if session_affinity not in (None, "ClientIP"):
            raise ConfigurationError("session_affinity must be None or 'ClientIP'")
        if session_affinity and service != "iptables":
            raise ConfigurationError("session_affinity='ClientIP' needs service='iptables'")
        self.name = name
        self.namespace = namespace
        self.service_kind = service
        self.dns_kind: DNSKind | None = dns
        self.l7_kind = l7
        self.l7_balance = l7_balance
        self.session_affinity = session_affinity
        self.dns_ttl_s = dns_ttl_s
        if max_connection_age_s is not None and not max_connection_age_s > 0:
            raise ConfigurationError(
                f"max_connection_age_s must be > 0 or None, got {max_connection_age_s}"
            )
        if identity_header is not None:
            check_pod_headers((identity_header,))
        self.settings = PodSettings(
            service_time_ms, max_concurrent, overflow, max_connection_age_s, identity_header
        )
        self.program = _program(servicer, pod_command, pod_ready_timeout_s, self.settings)
        self.fail_with = _failing_pods(fail_with, self.program)
        self.pods: list[Pod] = []
        self.target_port = 0
        self._initial_pods = pods
        self._subnet = f"127.0.{random.randint(2, 254)}"
        self._next_ordinal = 0
        self._dir: Path | None = None
        self._service: Frontend | None = None
        self._dns: Frontend | None = None
        self._l7: Frontend | None = None
        self._published: list[Endpoint] | None = None
        self._netns: NetworkNamespace | None = None
        self._pod_routes: dict[str, Bridge] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        ready = sum(pod.ready for pod in self.pods)
        parts = [f"{len(self.pods)} pods ({ready} ready)", f"service={self.service_kind}"]
        if self.dns_kind:
            parts.append(f"dns={self.dns_kind}")
        if self.l7_kind:
            parts.append(f"l7={self.l7_kind}")
        state = "running" if self.running else "stopped"
        return f"<LocalCluster {self.name}.{self.namespace} {state}: {', '.join(parts)}>"

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def workdir(self) -> Path | None:
        """The temp dir with every part's config and log (removed by :meth:`stop`)."""
        return self._dir

    @property
    def running(self) -> bool:
        return self._dir is not None

    def start(self) -> LocalCluster:
        """Start the pods, then the Service, DNS and L7 proxy in front of them."""
        with self._lock:
            if self.running:
                raise ClusterError("the cluster is already running")
            self._dir = Path(tempfile.mkdtemp(prefix=f"grpc-balance-{self.name}-"))
            try:
                if self.service_kind == "iptables":
                    self._netns = NetworkNamespace()
                self._start_pods(self._initial_pods)
                ready = self.endpoints()
                self._service = self._make_service(self._dir)
                self._service.start(ready)
                if self.dns_kind is not None:
                    self._dns = self._make_dns(self._dir)
                    self._dns.start(ready)
                if self.l7_kind is not None:
                    self._l7 = self._make_l7(self._dir)
                    self._l7.start(ready)
                self._published = ready
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Stop every process and remove the temp dir; idempotent, safe after a failed start."""
        with self._lock:
            for frontend in (self._l7, self._dns, self._service):
                if frontend is not None:
                    frontend.stop()
            self._l7 = self._dns = self._service = None
            for pod in self.pods:
                pod.terminate()
            for pod in self.pods:
                pod.stop()
            self.pods = []
            for bridge in self._pod_routes.values():
                bridge.close()
            self._pod_routes = {}
            if self._netns is not None:
                self._netns.close()
                self._netns = None
            self._published = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    # -- where clients connect ---------------------------------------------------------------

    @property
    def service_target(self) -> str:
        """The L4 Service, ``host:port`` (ClusterIP:servicePort, reachable from this host)."""
        return self._frontend(self._service, "service").address

    @property
    def fqdn(self) -> str:
        """The headless Service's DNS name."""
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    @property
    def dns_address(self) -> str:
        return self._frontend(self._dns, "dns").address

    @property
    def headless_target(self) -> str:
        """A gRPC target that resolves the headless Service through the cluster DNS."""
        return f"dns://{self.dns_address}/{self.fqdn}:{self.target_port}"

    @property
    def l7_target(self) -> str:
        """The L7 proxy, ``host:port``."""
        return self._frontend(self._l7, "l7").address

    @property
    def network_namespace(self) -> NetworkNamespace | None:
        """The namespace the pods and kube-proxy's rules live in (``iptables``), else None."""
        return self._netns

    # -- ground truth ------------------------------------------------------------------------

    def pod(self, name: str) -> Pod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise ClusterError(f"no pod {name!r}; pods: {[pod.name for pod in self.pods]}")

    def endpoints(self) -> list[Endpoint]:
        """The ready endpoints now: pods alive and SERVING."""
        return [pod.endpoint for pod in self.pods if pod.ready]

    def stats(self) -> dict[str, admin_pb.PodStats]:
        """Each live pod's full ``PodAdmin.GetStats`` snapshot."""
        return {pod.name: pod.stats() for pod in self.pods if pod.alive}

    def served(self) -> dict[str, int]:
        """Calls each live pod received, by its own count (dead pods took theirs along)."""
        return {name: stats.total_calls for name, stats in self.stats().items()}

    def reset_counts(self) -> None:
        for pod in self.pods:
            if pod.alive:
                pod.stats(reset=True)

    # -- what happens to pods ------------------------------------------------------------------

    def scale(self, replicas: int) -> None:
        """Add pods (new names, new IPs) or remove the newest ones, like a Deployment."""
        if not 0 <= replicas <= _MAX_PODS:
            raise ConfigurationError(f"replicas must be between 0 and {_MAX_PODS}")
        with self._lock:
            self._require_running()
            if replicas > len(self.pods):
                self._start_pods(replicas - len(self.pods))
            else:
                leaving = self.pods[replicas:]
                self.pods = self.pods[:replicas]
                self.refresh()  # out of the endpoints first, then terminated, as Kubernetes does
                for pod in leaving:
                    pod.terminate()
                for pod in leaving:
                    pod.stop()
                    bridge = self._pod_routes.pop(pod.name, None)
                    if bridge is not None:
                        bridge.close()
            self.refresh()

    def kill(self, name: str) -> None:
        """SIGKILL one pod; out of the Service, DNS and L7 proxy when this returns."""
        with self._lock:
            self.pod(name).kill()
            self.refresh()

    def restart(self, name: str) -> None:
        """Start a pod again on the same IP and port (stopping it first if it still runs)."""
        with self._lock:
            pod = self.pod(name)
            if pod.alive:
                pod.stop()
                self.refresh()
            pod.start()
            self.refresh()

    def pause(self, name: str) -> None:
        """SIGSTOP one pod: it hangs but stays in the endpoints (its process is alive, and no
        readiness probe runs here to fail), as a hung pod does until its probe times out.
        Call :meth:`resume` before anything asks it for its counts."""
        with self._lock:
            self.pod(name).pause()

    def resume(self, name: str) -> None:
        """SIGCONT a paused pod."""
        with self._lock:
            self.pod(name).resume()

    def set_serving(self, name: str, serving: bool) -> None:
        """Flip a pod's health; a NOT_SERVING pod leaves the endpoints but keeps running."""
        with self._lock:
            self.pod(name).set_serving(serving)
            self.refresh()

    def configure(
        self, name: str, *, service_time_ms: float | None = None, max_concurrent: int | None = None
    ) -> None:
        """Change one pod's service time or capacity while it runs."""
        self.pod(name).configure(service_time_ms=service_time_ms, max_concurrent=max_concurrent)

    def refresh(self) -> None:
        """Push the ready endpoints to every frontend if they changed (e.g. a pod crashed)."""
        with self._lock:
            ready = self.endpoints()
            if ready == self._published:
                return
            for frontend in (self._service, self._dns, self._l7):
                if frontend is not None:
                    frontend.update(ready)
            self._published = ready

    # -- internals ---------------------------------------------------------------------------

    def _start_pods(self, count: int) -> None:
        assert self._dir is not None
        new = [self._new_pod() for _ in range(count)]
        if not new:
            return
        try:
            if self.target_port == 0:
                self._launch_first(new)
            else:
                self._launch_all(new)
        except BaseException:
            for pod in new:  # not in self.pods yet: stop() would not reap them
                pod.stop()
            raise
        self.pods.extend(new)
        if self._netns is not None:
            for pod in new:
                # The pod's own ip:port on the host, forwarded inside: the route into the
                # namespace that the DNS's clients, the L7 proxy and the admin calls take.
                try:
                    bridge = self._netns.bridge(pod.address, listen=(pod.ip, pod.port))
                except NamespaceError as exc:
                    raise ClusterError(f"{pod.name}: {exc}") from exc
                self._pod_routes[pod.name] = bridge

    def _launch_first(self, new: list[Pod]) -> None:
        """The first pod picks the shared target port; the others bind the same port on their
        own IPs. If one of those is taken there, draw a new port for all."""
        for attempt in range(_PORT_ATTEMPTS):
            first = new[0]
            first.port = 0
            first.start()
            self.target_port = first.port
            try:
                self._launch_all(new[1:])
                return
            except ClusterError:
                for pod in new:
                    pod.stop()
                self.target_port = 0
                if attempt == _PORT_ATTEMPTS - 1:
                    raise

    def _launch_all(self, pods: list[Pod]) -> None:
        for pod in pods:
            pod.port = self.target_port
            pod.launch()
        for pod in pods:
            pod.wait_ready()

    def _new_pod(self) -> Pod:
        assert self._dir is not None
        ordinal = self._next_ordinal
        if ordinal >= _MAX_PODS:
            raise ClusterError(f"this cluster has used up its {_MAX_PODS} pod IPs")
        self._next_ordinal += 1
        return Pod(
            f"{self.name}-{ordinal}",
            f"{self._subnet}.{ordinal + 1}",
            self.target_port,
            namespace=self.namespace,
            settings=replace(self.settings, fail_with=self.fail_with.get(ordinal)),
            log_dir=self._dir,
            launcher=self._netns.exec_prefix if self._netns is not None else (),
            program=self.program,
        )

    def _make_service(self, log_dir: Path) -> Frontend:
        if self._netns is not None:
            return IptablesService(
                self._netns,
                name=self.name,
                namespace=self.namespace,
                cluster_ip=CLUSTER_IP,
                port=SERVICE_PORT,
                session_affinity=self.session_affinity,
            )
        if self.service_kind == "haproxy":
            return HAProxyService(log_dir, avoid_port=self.target_port)
        return UserspaceService(log_dir, avoid_port=self.target_port)

    def _make_l7(self, log_dir: Path) -> Frontend:
        if self.l7_kind == "nginx":
            return NginxL7(
                log_dir,
                balance="least_conn" if self.l7_balance == "leastconn" else "round_robin",
                avoid_port=self.target_port,
            )
        return HAProxyL7(log_dir, balance=self.l7_balance, avoid_port=self.target_port)

    def _make_dns(self, log_dir: Path) -> Frontend:
        if self.dns_kind == "dnsmasq":
            return DnsmasqDNS(log_dir, name=self.fqdn, ttl_s=self.dns_ttl_s)
        return EmbeddedDNS(log_dir, name=self.fqdn, ttl_s=self.dns_ttl_s)

    def _frontend(self, frontend: Frontend | None, what: str) -> Frontend:
        if frontend is None:
            if not self.running:
                raise ClusterError("the cluster is not running")
            raise ClusterError(f"this cluster was started without {what}")
        return frontend

    def _require_running(self) -> None:
        if not self.running:
            raise ClusterError("the cluster is not running")


def _failing_pods(fail_with: Mapping[int, str] | None, program: PodProgram) -> dict[int, str]:
    """``fail_with`` checked: pod ordinals to status names, for the harness's own pods only."""
    failing = dict(fail_with or {})
    if failing and program is not None:
        raise ConfigurationError("fail_with shapes the harness's own pods; not a user's service")
    for ordinal, name in failing.items():
        if name not in grpc.StatusCode.__members__ or name == "OK":
            raise ConfigurationError(f"fail_with: pod {ordinal}: no failing status named {name!r}")
    return failing


def _program(
    servicer: str | RegisterServicer | None,
    pod_command: Sequence[str] | None,
    ready_timeout_s: float,
    settings: PodSettings,
) -> PodProgram:
    """What the pods run, checked: the user's servicer or command, or None (charge-points)."""
    if servicer is None and pod_command is None:
        return None
    if servicer is not None and pod_command is not None:
        raise ConfigurationError("pass servicer or pod_command, not both")
    own = PodSettings(max_connection_age_s=settings.max_connection_age_s)
    if settings != own:
        raise ConfigurationError(
            "service_time_ms, max_concurrent, overflow and identity_header shape the "
            "harness's own pods; "
            "the user's service has its own"
        )
    if servicer is not None:
        return ServicerProgram(servicer_reference(servicer))
    assert pod_command is not None
    if isinstance(pod_command, str) or not pod_command:
        raise ConfigurationError("pod_command must be a non-empty list of arguments")
    if settings.max_connection_age_s is not None:
        raise ConfigurationError(
            "max_connection_age_s is set by the harness's server; a pod_command sets its own"
        )
    if not ready_timeout_s > 0:
        raise ConfigurationError(f"pod_ready_timeout_s must be > 0, got {ready_timeout_s}")
    return CommandProgram(tuple(pod_command), ready_timeout_s)
