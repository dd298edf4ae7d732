"""Endpoints, and the interface of everything that follows them (Service, DNS, L7 proxy).

In Kubernetes the Endpoints object lists the ready pods of a Service, and kube-proxy, CoreDNS
and Envoy each watch it. Here :class:`Frontend` is that watcher's interface: the cluster calls
``update()`` after every change, and an implementation has applied it when ``update()`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["Endpoint", "Frontend"]


@dataclass(frozen=True, order=True)
class Endpoint:
    """One ready pod: its name, IP and target port."""

    name: str
    ip: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@runtime_checkable
class Frontend(Protocol):
    """Something in front of the pods that follows the ready endpoints."""

    @property
    def address(self) -> str:
        """``host:port`` where clients reach it (host-reachable)."""
        ...

    def start(self, endpoints: Sequence[Endpoint]) -> None:
        """Start serving ``endpoints``; ready when this returns."""
        ...

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Follow a new set of ready endpoints; established connections to live pods survive."""
        ...

    def stop(self) -> None:
        """Stop and release everything; idempotent."""
        ...
