"""Client-side gRPC load balancing behind Kubernetes Services.

See which pod served each call, detect pod affinity, and fix it on the channels you already have.
"""

from grpc_balance_mw.connection_age import connection_age_options
from grpc_balance_mw.errors import BalanceError, ConfigurationError, MalformedPodHeader
from grpc_balance_mw.identity import (
    IDENTITY_HEADERS,
    POD_HEADER,
    POD_IP_HEADER,
    POD_NAMESPACE_HEADER,
    PodIdentity,
    pod_from_metadata,
)

__version__ = "0.1.0"

__all__ = [
    "IDENTITY_HEADERS",
    "POD_HEADER",
    "POD_IP_HEADER",
    "POD_NAMESPACE_HEADER",
    "BalanceError",
    "ConfigurationError",
    "MalformedPodHeader",
    "PodIdentity",
    "__version__",
    "connection_age_options",
    "pod_from_metadata",
]
