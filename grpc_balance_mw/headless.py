"""Headless Service targets: what a ``dns:`` target's name resolves to, one A record per ready pod.

A channel to a headless Service (``dns:///charge-points.ev.svc.cluster.local:50051`` with
``round_robin``) connects to every address the name resolves to, so the DNS answer is the best
count of the pods that exist. The probe reads it with the same resolver settings as the channel:
the DNS server named in the target's authority (``dns://10.96.0.10:53/...``, queried directly),
or the system resolver when there is none.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from grpc_balance_mw.dns_message import lookup_a
from grpc_balance_mw.errors import ConfigurationError

_log = logging.getLogger(__name__)

#: gRPC's default port for a target without one.
DEFAULT_PORT = 443
DNS_PORT = 53


@dataclass(frozen=True)
class DnsTarget:
    """A parsed ``dns:[//authority/]host[:port]`` target.

    Attributes:
        authority: ``host:port`` of the DNS server to ask, or None for the system resolver.
        host: the name to resolve.
        port: the service port the channel dials.
    """

    authority: str | None
    host: str
    port: int


def _split_host_port(hostport: str, default_port: int) -> tuple[str, int]:
    if hostport.startswith("["):  # [v6]:port
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host, port = hostport, ""
    if not host:
        raise ValueError(f"no host in {hostport!r}")
    return host, int(port) if port else default_port


def parse_dns_target(target: str) -> DnsTarget | None:
    """The parts of a ``dns:`` target, or None for any other target (or a malformed one)."""
    if not target.startswith("dns:"):
        return None
    rest = target[len("dns:") :]
    authority: str | None = None
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
        authority = authority or None
    try:
        host, port = _split_host_port(rest, DEFAULT_PORT)
        if authority is not None:
            auth_host, auth_port = _split_host_port(authority, DNS_PORT)
            authority = f"{auth_host}:{auth_port}"
    except ValueError:
        return None
    return DnsTarget(authority, host, port)


def resolve_addresses(target: DnsTarget, timeout_s: float = 2.0) -> list[str] | None:
    """The sorted, distinct addresses ``target.host`` resolves to; None when DNS gave no answer.

    An NXDOMAIN is an answer (no pods: ``[]``); a timeout, a refused query or an unparsable
    response is not (``None``), so a DNS failure never reads as "all pods are gone".
    """
    if target.authority is not None:
        try:
            return lookup_a(target.authority, target.host, timeout=timeout_s)
        except (ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
            _log.debug(
                "unparsable DNS answer for %s from %s: %s", target.host, target.authority, exc
            )
            return None
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        if isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_NONAME:
            return []
        _log.debug("could not resolve %s: %s", target.host, exc)
        return None
    addresses = {str(info[4][0]) for info in infos}
    return sorted(addresses, key=ipaddress.ip_address)


# -- the headless fix, all four parts ------------------------------------------------------------

#: How long gRPC core waits at least between two DNS resolutions of a channel (its default is
#: 30 s). Lower means new pods are found sooner after a connection drops, at the price of more
#: queries to the cluster DNS: one per channel per interval at most, and only when core asks.
DEFAULT_MIN_RESOLUTION_INTERVAL_S = 30.0


def normalize_target(target: str) -> str:
    """``target`` with the ``dns:`` scheme made explicit; ConfigurationError for other schemes.

    A headless Service is only balanced per pod when the name resolves through DNS to one A record
    per pod; ``ipv4:``/``ipv6:`` lists are static and ``unix:`` has one server.
    """
    if target.startswith("dns:"):
        if parse_dns_target(target) is None:
            raise ConfigurationError(f"not a valid dns: target: {target!r}")
        return target
    scheme, sep, _ = target.partition(":")
    if sep and scheme in ("ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"):
        raise ConfigurationError(
            f"{target!r} does not resolve through DNS: a headless Service needs a dns: target "
            "such as dns:///charge-points.ev.svc.cluster.local:50051"
        )
    normalized = f"dns:///{target}"
    if parse_dns_target(normalized) is None:
        raise ConfigurationError(f"not a valid target: {target!r}")
    return normalized


def headless_service_config(health_service: str | None = "") -> str:
    """The service config of a headless channel: ``round_robin`` over every address, and
    client-side health checking (``healthCheckConfig``) so a NOT_SERVING pod gets no calls
    while DNS still lists it. ``health_service`` None turns health checking off."""
    config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    return json.dumps(config, separators=(",", ":"))


def headless_options(
    options: Sequence[tuple[str, Any]] | None,
    *,
    health_service: str | None,
    min_resolution_interval_s: float,
) -> list[tuple[str, Any]]:
    """The user's channel options plus the headless fix's; the user's own service config or
    load-balancing policy is replaced (it is what the fix is about), with a warning."""
    if min_resolution_interval_s <= 0:
        raise ConfigurationError("min_resolution_interval_s must be > 0")
    replaced = {"grpc.service_config", "grpc.lb_policy_name"}
    kept = [(key, value) for key, value in options or () if key not in replaced]
    if len(kept) != len(list(options or ())):
        _log.warning(
            "headless channel: your grpc.service_config / grpc.lb_policy_name option is replaced "
            "by round_robin with health checking"
        )
    return [
        *kept,
        ("grpc.service_config", headless_service_config(health_service)),
        ("grpc.dns_min_time_between_resolutions_ms", int(min_resolution_interval_s * 1000)),
    ]


@dataclass(frozen=True)
class HeadlessCheck:
    """What a headless target looks like from here.

    Attributes:
        target: the ``dns:`` target checked.
        addresses: what its name resolved to (None: DNS gave no answer).
        unreachable: the addresses whose port refused or did not answer.
        problems: one readable line per problem found, with the fix.
    """

    target: str
    addresses: tuple[str, ...] | None
    unreachable: tuple[str, ...]
    problems: tuple[str, ...]


def check_headless(target: str, *, timeout_s: float = 1.0, max_dials: int = 16) -> HeadlessCheck:
    """Resolve a headless target and dial its port on each address (at most ``max_dials``)."""
    parsed = parse_dns_target(normalize_target(target))
    assert parsed is not None  # normalize_target checked it
    addresses = resolve_addresses(parsed, timeout_s)
    problems: list[str] = []
    if addresses is None:
        problems.append(
            f"DNS gave no answer for {parsed.host}"
            + (f" from {parsed.authority}" if parsed.authority else "")
            + ": the channel cannot find any pod until it does"
        )
        return HeadlessCheck(target, None, (), tuple(problems))
    if not addresses:
        problems.append(f"{parsed.host} does not exist (NXDOMAIN) or has no ready pods")
    elif len(addresses) == 1:
        problems.append(
            f"{parsed.host} resolves to one address ({addresses[0]}): that is a ClusterIP (or a "
            "single pod), so round_robin has one backend and balances nothing. Use the headless "
            "Service (spec.clusterIP: None) name"
        )
    unreachable = tuple(
        address
        for address in addresses[:max_dials]
        if not _port_answers(address, parsed.port, timeout_s)
    )
    if unreachable:
        problems.append(
            f"port {parsed.port} does not answer on {', '.join(unreachable)}: a headless Service "
            "maps no ports, so dial the pods' containerPort (the Service's targetPort), not the "
            "Service port"
        )
    return HeadlessCheck(target, tuple(addresses), unreachable, tuple(problems))


def _port_answers(address: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


_warned: set[str] = set()
_warned_lock = threading.Lock()


def check_in_background(target: str) -> threading.Thread | None:
    """Check ``target`` on a daemon thread and log each problem as a warning, once per target
    per process; None if it was checked already."""
    with _warned_lock:
        if target in _warned:
            return None
        _warned.add(target)

    def run() -> None:
        try:
            for problem in check_headless(target).problems:
                _log.warning("headless channel to %s: %s", target, problem)
        except Exception:  # a background thread: nothing above it would ever see the error
            _log.exception("could not check the headless target %s", target)

    thread = threading.Thread(target=run, name=f"headless-check {target}", daemon=True)
    thread.start()
    return thread


def prepare_headless(
    target: str,
    options: Sequence[tuple[str, Any]] | None,
    *,
    health_service: str | None,
    min_resolution_interval_s: float,
    check: bool,
) -> tuple[str, list[tuple[str, Any]]]:
    """The target and options of a headless channel (see ``headless_channel``), sync or aio."""
    dns_target = normalize_target(target)
    channel_options = headless_options(
        options, health_service=health_service, min_resolution_interval_s=min_resolution_interval_s
    )
    if check:
        check_in_background(dns_target)
    return dns_target, channel_options
