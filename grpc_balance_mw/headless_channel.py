"""The headless fix in one call (sync): DNS scheme, ``round_robin``, health checking, re-resolution.

Usage::

    channel = headless_channel("charge-points-headless.ev.svc.cluster.local:50051")
    stub = ChargePointsStub(channel)

The four parts that are easy to get three-quarters right: the ``dns:`` scheme (made explicit),
the ``round_robin`` policy (a headless Service alone still gets ``pick_first``: one pod),
client-side health checking (``healthCheckConfig``: a pod going NOT_SERVING stops getting calls
before DNS drops it), and the DNS re-resolution interval. It checks the target once per process
on a background thread and warns when it resolves to one address (a ClusterIP, not a headless
Service) or when the pods' port does not answer (the Service port was dialled).

What it cannot fix: gRPC core re-resolves DNS only when a connection drops, so pods added later
get no calls until one does. Remedies: the server's ``connection_age_options()`` (every
connection is recycled, and each reconnect re-resolves), or the balanced channel's rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from grpc_balance_mw.headless import DEFAULT_MIN_RESOLUTION_INTERVAL_S, prepare_headless

__all__ = ["headless_channel"]


def headless_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    *,
    health_service: str | None = "",
    min_resolution_interval_s: float = DEFAULT_MIN_RESOLUTION_INTERVAL_S,
    check: bool = True,
) -> grpc.Channel:
    """A channel that balances every call over a headless Service's pods.

    Args:
        target: the headless Service's name and the pods' port (``host:port`` or ``dns:``).
        credentials: for TLS; None for plaintext.
        options: other channel options; a service config or LB policy in them is replaced.
        health_service: the ``grpc.health.v1`` service name to watch on each pod ("" is the
            server as a whole); None turns client-side health checking off.
        min_resolution_interval_s: at least this long between two DNS resolutions (gRPC's
            default is 30 s); lower finds new pods sooner after a connection drops, at one more
            DNS query per channel per interval at most.
        check: warn (once per target and process, in the background) about a single address or
            a port that does not answer.
    """
    dns_target, channel_options = prepare_headless(
        target,
        options,
        health_service=health_service,
        min_resolution_interval_s=min_resolution_interval_s,
        check=check,
    )
    if credentials is None:
        return grpc.insecure_channel(dns_target, options=channel_options)
    return grpc.secure_channel(dns_target, credentials, options=channel_options)
