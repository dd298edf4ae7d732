"""A local Kubernetes-like cluster for testing gRPC load balancing: real pods, real proxies.

See :class:`LocalCluster`; the pytest plugin is :mod:`grpc_balance_mw.testing.pytest_plugin`.
"""

from grpc_balance_mw.testing.cluster import (
    DNSKind,
    L7Kind,
    LocalCluster,
    ServiceKind,
    missing_components,
)
from grpc_balance_mw.testing.endpoints import Endpoint, Frontend
from grpc_balance_mw.testing.pods import Overflow, Pod, PodSettings
from grpc_balance_mw.testing.process import ClusterError, live_children
from grpc_balance_mw.testing.user_pod import PodInfo, RegisterServicer

__all__ = [
    "ClusterError",
    "DNSKind",
    "Endpoint",
    "Frontend",
    "L7Kind",
    "LocalCluster",
    "Overflow",
    "Pod",
    "PodInfo",
    "PodSettings",
    "RegisterServicer",
    "ServiceKind",
    "live_children",
    "missing_components",
]
