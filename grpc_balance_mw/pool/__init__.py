"""The balanced channel's pure core: lanes, pickers, rotation policies and the pool's bookkeeping.

No gRPC here: the sync (:mod:`grpc_balance_mw.balanced`) and asyncio
(:mod:`grpc_balance_mw.aio.balanced`) channels drive the same :class:`LanePool`.
"""

from grpc_balance_mw.pool.lane import Lane, LanePurpose, LaneState
from grpc_balance_mw.pool.outliers import OutlierDetection, OutlierEjector, OutlierEvent
from grpc_balance_mw.pool.pickers import LeastOutstanding, Picker, RoundRobin, Weighted
from grpc_balance_mw.pool.pool import (
    CheckResult,
    LanePool,
    NoLane,
    Plan,
    PoolClosed,
    PoolConfig,
    Signals,
    Stuck,
    default_rotation,
)
from grpc_balance_mw.pool.rotation import (
    Rotation,
    RotationContext,
    rotate_after_age,
    rotate_after_calls,
    rotate_any,
    rotate_never,
    rotate_on_alarm,
    rotate_when_pod_gone,
)
from grpc_balance_mw.pool.weights import SlowStart, WeightConfig

__all__ = [
    "CheckResult",
    "Lane",
    "LanePool",
    "LanePurpose",
    "LaneState",
    "LeastOutstanding",
    "NoLane",
    "OutlierDetection",
    "OutlierEjector",
    "OutlierEvent",
    "Picker",
    "Plan",
    "PoolClosed",
    "PoolConfig",
    "Rotation",
    "RotationContext",
    "RoundRobin",
    "Signals",
    "SlowStart",
    "Stuck",
    "WeightConfig",
    "Weighted",
    "default_rotation",
    "rotate_after_age",
    "rotate_after_calls",
    "rotate_any",
    "rotate_never",
    "rotate_on_alarm",
    "rotate_when_pod_gone",
]
