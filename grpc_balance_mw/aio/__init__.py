"""The ``grpc.aio`` adapters, with the same names as their sync counterparts in
:mod:`grpc_balance_mw`."""

from grpc_balance_mw.aio.channel import BalancedChannel, balanced_channel, channel_factory
from grpc_balance_mw.aio.client import AffinityInterceptors, affinity_interceptors
from grpc_balance_mw.aio.headless_channel import headless_channel
from grpc_balance_mw.aio.observed_channel import ObservedChannel, observe
from grpc_balance_mw.aio.redial import DialPerRequestChannel, dial_per_request_channel

__all__ = [
    "AffinityInterceptors",
    "BalancedChannel",
    "DialPerRequestChannel",
    "ObservedChannel",
    "affinity_interceptors",
    "balanced_channel",
    "channel_factory",
    "dial_per_request_channel",
    "headless_channel",
    "observe",
]
