"""The headless fix in one call, for ``grpc.aio``: see :mod:`grpc_balance_mw.headless_channel`."""

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
) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel that balances every call over a headless Service's pods; the
    arguments are those of the sync ``grpc_balance_mw.headless_channel.headless_channel``."""
    dns_target, channel_options = prepare_headless(
        target,
        options,
        health_service=health_service,
        min_resolution_interval_s=min_resolution_interval_s,
        check=check,
    )
    if credentials is None:
        return grpc.aio.insecure_channel(dns_target, options=channel_options)
    return grpc.aio.secure_channel(dns_target, credentials, options=channel_options)
