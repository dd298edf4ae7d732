"""The ``grpc.aio`` adapters, with the same names as their sync counterparts in
:mod:`grpc_balance_mw`."""

from grpc_balance_mw.aio.balanced import BalancedChannel, balanced_channel, channel_factory
from grpc_balance_mw.aio.dial_per_request import DialPerRequestChannel, dial_per_request_channel
from grpc_balance_mw.aio.headless_channel import headless_channel
from grpc_balance_mw.aio.interceptors import AffinityInterceptors, affinity_interceptors
from grpc_balance_mw.aio.observed_channel import ObservedChannel, observe

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
