"""Connections as evidence: where fresh connections landed, and how likely that is by chance.

Where a ClusterIP Service sends a connection is one draw of kube-proxy's random pick; every call
on that connection follows it. So a target's spread is judged on its recent connections (each
lane's first call and each reconnect, the probe's dials), with the confidence their number gives:
three connections on one of three pods happen by chance one time in nine, eight one time in
2,187.
"""

from __future__ import annotations

import math

from grpc_balance_mw.affinity.counts import TopCounter
from grpc_balance_mw.affinity.window import SampleWindow

__all__ = ["ConnectionWindow", "all_on_one_chance", "top_count_chance"]


def all_on_one_chance(connections: int, pods: int) -> float:
    """The chance that ``connections`` placed at random over ``pods`` pods all share one pod."""
    if connections <= 1 or pods <= 1:
        return 1.0
    return float((1.0 / pods) ** (connections - 1))


def top_count_chance(top: int, connections: int, pods: int) -> float:
    """An upper bound on the chance that some pod gets ``top`` or more of ``connections``
    placed at random over ``pods`` pods (a binomial tail, times ``pods`` for any pod)."""
    if pods <= 1 or top <= connections / pods:
        return 1.0
    p = 1.0 / pods
    tail = math.fsum(
        math.comb(connections, i) * p**i * (1.0 - p) ** (connections - i)
        for i in range(top, connections + 1)
    )
    return min(1.0, pods * tail)


class ConnectionWindow(SampleWindow[tuple[float, str, bool]]):
    """The pods that the last connections landed on: at most ``max_connections``, none older
    than ``max_age_s``; the top pod's count in O(1).

    ``version`` changes with every change, so a verdict on the window can be cached.
    """

    def __init__(self, max_connections: int, max_age_s: float) -> None:
        super().__init__(max_age_s)
        self.max_connections = max_connections
        self.pods: TopCounter[str] = TopCounter()
        self.probed = 0

    def __repr__(self) -> str:
        return f"<ConnectionWindow {len(self._samples)} connections on {len(self.pods)} pods>"

    @property
    def top(self) -> int:
        """How many of the window's connections landed on its busiest pod."""
        return self.pods.top

    def add(self, pod: str, at: float, *, probe: bool = False) -> None:
        self._samples.append((at, pod, probe))
        self.pods.add(pod)
        self.probed += probe
        self.version += 1
        if len(self._samples) > self.max_connections:
            self._drop_oldest()
        self.evict(at)

    def _drop_oldest(self) -> None:
        _, pod, probe = self._samples.popleft()
        self.pods.remove(pod)
        self.probed -= probe
        self.version += 1
