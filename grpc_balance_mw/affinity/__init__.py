"""Pod affinity detection: the pure core (no gRPC I/O) the client interceptors feed."""

from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallObserver, ObservedCall, PodReader, PodReading
from grpc_balance_mw.affinity.registry import AffinityRegistry, default_registry
from grpc_balance_mw.affinity.state import AffinitySnapshot, AffinityState, PodShare, Transition

__all__ = [
    "AffinityConfig",
    "AffinityDetector",
    "AffinityRegistry",
    "AffinitySnapshot",
    "AffinityState",
    "CallObserver",
    "ObservedCall",
    "PodReader",
    "PodReading",
    "PodShare",
    "Transition",
    "default_registry",
]
