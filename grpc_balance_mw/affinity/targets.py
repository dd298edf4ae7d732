"""How many addresses a target stands for: what decides whether a client can balance per call.

A target that names one address (an IP literal, a ClusterIP Service's name once resolved) gives
the channel one connection: calls that still switch pods on it were balanced by something in
between (an L7 proxy). A name that resolves to several addresses (a headless Service) lets the
client's own ``round_robin`` switch pods per call. A name not resolved yet tells neither.
"""

from __future__ import annotations

import ipaddress

__all__ = ["literal_addresses"]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _host_of(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    if hostport.count(":") > 1:  # a bare IPv6 address
        return hostport
    return hostport.rsplit(":", 1)[0] if ":" in hostport else hostport


def literal_addresses(target: str) -> int | None:
    """How many addresses ``target`` names without any lookup, or None when it names a host.

    ``10.0.0.1:80``, ``[::1]:80``, ``dns:///10.0.0.1:80`` and ``unix:/path`` name one;
    ``ipv4:10.0.0.1:80,10.0.0.2:80`` names two; ``svc.ns:80`` and ``dns:///svc.ns:80`` need
    a lookup (None).
    """
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return 1
    if target.startswith(("ipv4:", "ipv6:")):
        return len([part for part in target.split(":", 1)[1].split(",") if part])
    rest = target
    if rest.startswith("dns:"):
        rest = rest[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[-1] if "/" in rest[2:] else ""
    return 1 if rest and _is_ip(_host_of(rest)) else None
