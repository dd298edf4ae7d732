"""Client-side gRPC load balancing behind Kubernetes Services.

See which pod served each call, detect pod affinity, and fix it on the channels you already
have. The sync API is here; :mod:`grpc_balance_mw.aio` has the same names for ``grpc.aio``.
"""

from grpc_balance_mw._version import __version__
from grpc_balance_mw.affinity import AffinityConfig, AffinityRegistry, AffinityState
from grpc_balance_mw.balanced import BalancedChannel, balanced_channel, channel_factory
from grpc_balance_mw.connection_age import connection_age_options
from grpc_balance_mw.dial_per_request import DialPerRequestChannel, dial_per_request_channel
from grpc_balance_mw.errors import BalanceError, ConfigurationError, MalformedPodHeader
from grpc_balance_mw.headless_channel import headless_channel
from grpc_balance_mw.identity import (
    IDENTITY_HEADERS,
    POD_HEADER,
    POD_IP_HEADER,
    POD_NAMESPACE_HEADER,
    PodIdentity,
    pod_from_metadata,
)
from grpc_balance_mw.interceptors import AffinityInterceptor, affinity_interceptors
from grpc_balance_mw.observed_channel import ObservedChannel, observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.retry import RetryBudget, RetryPolicy
from grpc_balance_mw.telemetry import AffinityTelemetry

__all__ = [
    "IDENTITY_HEADERS",
    "POD_HEADER",
    "POD_IP_HEADER",
    "POD_NAMESPACE_HEADER",
    "AffinityConfig",
    "AffinityInterceptor",
    "AffinityRegistry",
    "AffinityState",
    "AffinityTelemetry",
    "BalanceError",
    "BalancedChannel",
    "ConfigurationError",
    "DialPerRequestChannel",
    "MalformedPodHeader",
    "ObserveOptions",
    "ObservedChannel",
    "PodIdentity",
    "Rebalance",
    "RetryBudget",
    "RetryPolicy",
    "__version__",
    "affinity_interceptors",
    "balanced_channel",
    "channel_factory",
    "connection_age_options",
    "dial_per_request_channel",
    "headless_channel",
    "observe",
    "pod_from_metadata",
]
