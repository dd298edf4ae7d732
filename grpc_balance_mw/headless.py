"""Headless Service targets: what a ``dns:`` target's name resolves to, one A record per ready pod.

A channel to a headless Service (``dns:///charge-points.ev.svc.cluster.local:50051`` with
``round_robin``) connects to every address the name resolves to, so the DNS answer is the best
count of the pods that exist. The probe reads it with the same resolver settings as the channel:
the DNS server named in the target's authority (``dns://10.96.0.10:53/...``, queried directly),
or the system resolver when there is none.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from grpc_balance_mw.dns_message import lookup_a

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
