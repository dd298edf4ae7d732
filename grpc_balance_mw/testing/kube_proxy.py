"""kube-proxy's iptables mode, reproduced rule for rule inside a network namespace.

:func:`render` is pure: Services and their endpoints in, ``iptables-restore`` text out, in the
shape kube-proxy writes (``pkg/proxy/iptables/proxier.go``)::

    OUTPUT -> KUBE-SERVICES -> KUBE-SVC-<hash>   one rule per endpoint:
                                                 -m statistic --mode random --probability 1/(n-i)
                            -> KUBE-SEP-<hash>   -j DNAT --to-destination ip:port

with ``-m recent`` rules for ``sessionAffinity: ClientIP`` and, for a Service without endpoints,
a REJECT in the filter table. :class:`KubeProxy` loads it into one namespace and does a full
resync on every change, as kube-proxy does; :class:`IptablesService` is one Service on top of it
with a host-side :class:`~grpc_balance_mw.testing.netns.Bridge` to its ClusterIP.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Protocol

from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.testing.netns import Bridge, NetworkNamespace

__all__ = [
    "DEFAULT_AFFINITY_TIMEOUT_S",
    "IptablesService",
    "KubeProxy",
    "ServicePort",
    "SessionAffinity",
    "chain_hash",
    "endpoint_addresses",
    "pick_chances",
    "probability",
    "render",
    "saved_probability",
]

SessionAffinity = Literal["ClientIP"] | None
#: ``service.spec.sessionAffinityConfig.clientIP.timeoutSeconds`` default (3 hours).
DEFAULT_AFFINITY_TIMEOUT_S = 10800
_MASQ_MARK = "0x4000"


class HasAddress(Protocol):
    """An endpoint object (the cluster's ``Endpoint``) rather than an ``(ip, port)`` tuple."""

    @property
    def ip(self) -> str: ...

    @property
    def port(self) -> int: ...


EndpointLike = tuple[str, int] | HasAddress


def chain_hash(*parts: str) -> str:
    """kube-proxy's chain-name hash: first 16 characters of base32(sha256(concatenation))."""
    digest = hashlib.sha256("".join(parts).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def probability(n: int) -> str:
    """The ``--probability`` kube-proxy writes for a pick among ``n``: ``%0.10f`` of 1/n."""
    return f"{1.0 / n:0.10f}"


def saved_probability(n: int) -> str:
    """What ``iptables-save`` prints back for :func:`probability` (``0.33333333349`` for 3).

    The statistic match stores the probability as a 31-bit fraction, rounded, and prints it with
    eleven decimals.
    """
    stored = round(float(probability(n)) * 0x80000000)
    return f"{stored / 0x80000000:.11f}"


def pick_chances(probabilities: Sequence[float]) -> list[float]:
    """The chance each rule of a KUBE-SVC chain is the one taken, given each rule's probability.

    Rule ``i`` is reached only when every earlier rule did not match; a rule without a statistic
    match has probability 1.
    """
    chances, reach = [], 1.0
    for p in probabilities:
        chances.append(reach * p)
        reach *= 1.0 - p
    return chances


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service, with the endpoints kube-proxy would see for it.

    Attributes:
        name: the Service name.
        namespace: its Kubernetes namespace.
        cluster_ip: its ClusterIP (inside the namespace's service CIDR).
        port: the Service port.
        port_name: the port's name; it becomes ``:name`` in ``namespace/name:port_name``.
        protocol: TCP (the only protocol gRPC needs; the chain hash uses it lower-cased).
        endpoints: ``(ip, port)`` of the ready pods.
        session_affinity: ``None`` or ``"ClientIP"``.
        affinity_timeout_s: how long a client IP sticks to its pod.
    """

    name: str
    namespace: str
    cluster_ip: str
    port: int
    port_name: str = ""
    protocol: Literal["TCP"] = "TCP"
    endpoints: tuple[tuple[str, int], ...] = ()
    session_affinity: SessionAffinity = None
    affinity_timeout_s: int = DEFAULT_AFFINITY_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.session_affinity not in (None, "ClientIP"):
            raise ConfigurationError(f"unknown session affinity {self.session_affinity!r}")
        if not 0 < self.port < 65536:
            raise ConfigurationError(f"service port {self.port} out of range")

    @property
    def port_name_string(self) -> str:
        """``namespace/name[:port_name]``: kube-proxy's ServicePortName, in comments and hashes."""
        suffix = f":{self.port_name}" if self.port_name else ""
        return f"{self.namespace}/{self.name}{suffix}"

    @property
    def svc_chain(self) -> str:
        return "KUBE-SVC-" + chain_hash(self.port_name_string, self.protocol.lower())

    def sep_chain(self, endpoint: tuple[str, int]) -> str:
        ip, port = endpoint
        return "KUBE-SEP-" + chain_hash(
            self.port_name_string, self.protocol.lower(), f"{ip}:{port}"
        )

    def sorted_endpoints(self) -> list[tuple[str, int]]:
        """Endpoints in kube-proxy's order (by ``ip:port`` string), duplicates dropped."""
        return sorted(set(self.endpoints), key=lambda ep: f"{ep[0]}:{ep[1]}")


def _quote(comment: str) -> str:
    return f'"{comment}"'


def render(services: Iterable[ServicePort]) -> str:
    """The full ``iptables-restore`` input (filter and nat tables) for ``services``."""
    services = sorted(services, key=lambda s: (s.port_name_string, s.cluster_ip, s.port))
    filter_rules: list[str] = []
    nat_chains: list[str] = []
    nat_rules: list[str] = []
    for svc in services:
        proto = svc.protocol.lower()
        match = f"-m {proto} -p {proto} -d {svc.cluster_ip}/32 --dport {svc.port}"
        endpoints = svc.sorted_endpoints()
        if not endpoints:
            # kube-proxy REJECTs with an ICMP port-unreachable; for a ClusterIP routed via lo
            # that ICMP never reaches the local socket here, so send the RST a client would
            # otherwise infer from it: the connection is refused at once either way.
            comment = _quote(f"{svc.port_name_string} has no endpoints")
            filter_rules.append(
                f"-A KUBE-SERVICES -m comment --comment {comment} {match}"
                " -j REJECT --reject-with tcp-reset"
            )
            continue
        nat_chains.append(svc.svc_chain)
        comment = _quote(f"{svc.port_name_string} cluster IP")
        nat_rules.append(
            f"-A KUBE-SERVICES -m comment --comment {comment} {match} -j {svc.svc_chain}"
        )
        nat_rules.extend(_svc_rules(svc, endpoints))
        for endpoint in endpoints:
            nat_chains.append(svc.sep_chain(endpoint))
            nat_rules.extend(_sep_rules(svc, endpoint))
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        '-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals"'
        " -j KUBE-SERVICES",
        *filter_rules,
        "COMMIT",
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":KUBE-SERVICES - [0:0]",
        ":KUBE-MARK-MASQ - [0:0]",
        ":KUBE-POSTROUTING - [0:0]",
        *(f":{chain} - [0:0]" for chain in nat_chains),
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        # Our clients are local processes, so their packets traverse OUTPUT, not PREROUTING.
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {_MASQ_MARK}",
        f"-A KUBE-POSTROUTING -m mark ! --mark {_MASQ_MARK}/{_MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {_MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully",
        *nat_rules,
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


def _svc_rules(svc: ServicePort, endpoints: list[tuple[str, int]]) -> list[str]:
    rules = []
    if svc.session_affinity == "ClientIP":
        # A client seen within the timeout goes back to the endpoint that served it last.
        for endpoint in endpoints:
            sep = svc.sep_chain(endpoint)
            comment = _quote(f"{svc.port_name_string} -> {endpoint[0]}:{endpoint[1]}")
            rules.append(
                f"-A {svc.svc_chain} -m comment --comment {comment}"
                f" -m recent --name {sep} --rcheck --seconds {svc.affinity_timeout_s} --reap"
                f" -j {sep}"
            )
    n = len(endpoints)
    for i, endpoint in enumerate(endpoints):
        comment = _quote(f"{svc.port_name_string} -> {endpoint[0]}:{endpoint[1]}")
        statistic = ""
        if i < n - 1:
            # 1/(n-i) of what is left: every endpoint ends up with 1/n of new connections.
            statistic = f" -m statistic --mode random --probability {probability(n - i)}"
        rules.append(
            f"-A {svc.svc_chain} -m comment --comment {comment}{statistic}"
            f" -j {svc.sep_chain(endpoint)}"
        )
    return rules


def _sep_rules(svc: ServicePort, endpoint: tuple[str, int]) -> list[str]:
    ip, port = endpoint
    sep = svc.sep_chain(endpoint)
    comment = svc.port_name_string
    recent = f" -m recent --name {sep} --set" if svc.session_affinity == "ClientIP" else ""
    proto = svc.protocol.lower()
    return [
        # Hairpin: a pod reaching itself through its Service must be SNATed to come back.
        f"-A {sep} -m comment --comment {comment} -s {ip}/32 -j KUBE-MARK-MASQ",
        f"-A {sep} -m comment --comment {comment}{recent} -m {proto} -p {proto}"
        f" -j DNAT --to-destination {ip}:{port}",
    ]


class KubeProxy:
    """kube-proxy for one namespace: holds every Service there and resyncs all of them at once.

    Each sync replaces the namespace's whole filter and nat tables in one ``iptables-restore``
    (atomic, and stale chains vanish with it). The namespace is ours alone, so nothing else's
    rules are lost; the host's tables are never touched.
    """

    _by_namespace: ClassVar[dict[str, KubeProxy]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, netns: NetworkNamespace) -> None:
        self.netns = netns
        self.syncs = 0
        self._services: dict[tuple[str, str, int], ServicePort] = {}
        self._lock = threading.Lock()

    @classmethod
    def of(cls, netns: NetworkNamespace) -> KubeProxy:
        """The one KubeProxy of ``netns`` (two would overwrite each other's tables)."""
        with cls._registry_lock:
            for name in [n for n, p in cls._by_namespace.items() if p.netns.closed]:
                del cls._by_namespace[name]
            proxy = cls._by_namespace.get(netns.name)
            if proxy is None or proxy.netns is not netns:
                proxy = cls._by_namespace[netns.name] = cls(netns)
            return proxy

    def __repr__(self) -> str:
        return f"<KubeProxy {self.netns.name}: {len(self._services)} services, {self.syncs} syncs>"

    def apply(self, service: ServicePort) -> None:
        """Add or replace ``service`` and resync."""
        key = (service.cluster_ip, service.protocol, service.port)
        with self._lock:
            self._services[key] = service
            self._sync()

    def remove(self, service: ServicePort) -> None:
        """Drop ``service`` and resync (a no-op once the namespace is closed)."""
        key = (service.cluster_ip, service.protocol, service.port)
        with self._lock:
            if self._services.pop(key, None) is not None and not self.netns.closed:
                self._sync()

    def services(self) -> list[ServicePort]:
        with self._lock:
            return list(self._services.values())

    def save(self, table: str = "nat") -> str:
        """``iptables-save`` of one table inside the namespace."""
        return self.netns.run(["iptables-save", "-t", table])

    def _sync(self) -> None:
        self.netns.run(["iptables-restore"], input=render(self._services.values()))
        self.syncs += 1


class IptablesService:
    """One ClusterIP Service served by kube-proxy's iptables rules, reachable from the host.

    Args:
        netns: the namespace the pods run in; ``None`` creates one, which :meth:`stop` deletes.
        name: the Service name.
        namespace: its Kubernetes namespace (in chain hashes and comments).
        cluster_ip: its ClusterIP, inside the namespace's service CIDR.
        port: the Service port.
        session_affinity: ``None`` or ``"ClientIP"``.
        affinity_timeout_s: ClientIP stickiness timeout.
        port_name: the Service port's name, if it has one.
    """

    def __init__(
        self,
        netns: NetworkNamespace | None = None,
        name: str = "charge-points",
        namespace: str = "default",
        cluster_ip: str = "10.96.0.10",
        port: int = 80,
        *,
        session_affinity: SessionAffinity = None,
        affinity_timeout_s: int = DEFAULT_AFFINITY_TIMEOUT_S,
        port_name: str = "",
    ) -> None:
        self._owns_netns = netns is None
        self.netns = netns if netns is not None else NetworkNamespace()
        self.proxy = KubeProxy.of(self.netns)
        self.spec = ServicePort(
            name=name,
            namespace=namespace,
            cluster_ip=cluster_ip,
            port=port,
            port_name=port_name,
            session_affinity=session_affinity,
            affinity_timeout_s=affinity_timeout_s,
        )
        self._bridge: Bridge | None = None

    def __repr__(self) -> str:
        where = self._bridge.target if self._bridge else "stopped"
        return (
            f"<IptablesService {self.spec.port_name_string} {self.spec.cluster_ip}:"
            f"{self.spec.port} {len(self.spec.endpoints)} endpoints, {where}>"
        )

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT`` on the host, one connection to the ClusterIP per connection."""
        if self._bridge is None:
            raise ConfigurationError("IptablesService is not started")
        return self._bridge.target

    #: The name the cluster's Frontend interface uses for :attr:`target`.
    address = target

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        return self.spec.endpoints

    def start(self, endpoints: Sequence[EndpointLike] = ()) -> None:
        """Load the rules and open the host-side bridge; ready when this returns."""
        self.update(endpoints)
        if self._bridge is None:
            self._bridge = self.netns.bridge(f"{self.spec.cluster_ip}:{self.spec.port}")

    def update(self, endpoints: Sequence[EndpointLike]) -> None:
        """Re-render with these ready endpoints; applied when this returns.

        Established connections keep their pod (conntrack), as with kube-proxy; only new
        connections see the new rules.
        """
        self.spec = replace(self.spec, endpoints=endpoint_addresses(endpoints))
        self.proxy.apply(self.spec)

    def rules(self) -> str:
        """The namespace's nat table as ``iptables-save`` prints it."""
        return self.proxy.save("nat")

    def stop(self) -> None:
        """Close the bridge, drop the rules; delete the namespace if this Service made it."""
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None
        self.proxy.remove(self.spec)
        if self._owns_netns:
            self.netns.close()


def endpoint_addresses(endpoints: Iterable[EndpointLike]) -> tuple[tuple[str, int], ...]:
    """``(ip, port)`` of each endpoint, given tuples or endpoint objects with ``ip``/``port``."""
    return tuple(ep if isinstance(ep, tuple) else (ep.ip, ep.port) for ep in endpoints)
