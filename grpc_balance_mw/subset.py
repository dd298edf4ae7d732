"""Keeping many clients' subsets even: which pods a client's few lanes should stay on.

A client keeps a bounded number of lanes (a subset of the pods) however many pods there are, so
the fleet's connections grow as clients x lanes, not clients x pods. Through a ClusterIP the client
cannot choose the pod a connection lands on: kube-proxy picks one at random per connection, and
random picks pile up (500 clients x 6 lanes over 200 pods: the busiest pod holds about 1.7x the
mean of connections, and with them of load). The rule here keeps the subset even with what a
client can see, the pods' load reports (each pod says how many client connections it holds):

- **accept a dial** only if its pod holds at most ``(1 + slack)`` times the fleet mean, else dial
  again, up to ``redials`` times (then keep the last). This is "power of d choices" on where a
  connection lands, which a client can do through a VIP: each redial is one more random pick;
- **leave a pod** holding more than ``(1 + leave_slack)`` times the mean, with a probability such
  that, across all the clients there, about the excess leaves (not all of them at once: a herd
  that leaves together empties the pod and crowds another);
- **move to a hole**: a lane on a pod above the mean, while the client knows of a pod holding at
  least 2 fewer connections below the mean, tries a fresh connection with a smaller probability
  and keeps it only if its pod then holds fewer than the lane's pod did (else the lane stays):
  a move that only ever evens the counts. Without it nothing fills a pod that clients started
  away from (all clients dialling at once, before any report: 2 of 32 connections on one pod
  while the others held 5 to 7).

The fleet mean is estimated from the reports a client holds (:class:`LoadBook`: the pods its lanes,
dials and scouts reached, each report expiring after a while).

Where the pods' addresses are known (a headless Service, or pod IPs the servers stamp and the
network lets clients dial), :func:`rendezvous_subset` picks the subset as gRFC A68 does (rendezvous
hashing with a per-client seed, so a pod joining or leaving moves only the lanes it must) and skips
pods the rule refuses (bounded-load rendezvous), so the same rule keeps it even.

Everything here is pure: the pool and the fleet simulator (:mod:`grpc_balance_mw.simulate`) call it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from grpc_balance_mw.errors import ConfigurationError

__all__ = ["LoadBook", "PodReport", "SubsetRule", "rendezvous_rank", "rendezvous_subset"]


@dataclass(frozen=True)
class SubsetRule:
    """When a client keeps a connection on a pod, judged by the pod's reported connections.

    Attributes:
        slack: a fresh connection is kept if its pod holds at most ``(1 + slack) * mean``
            connections, counting the fresh one, or ``mean + 1`` if that is more (counts are
            whole numbers: with a mean of 5.3 a pod holding 6 is as even as a fleet can be).
        leave_slack: a lane on a pod holding more than ``(1 + leave_slack) * mean`` may leave it
            (above ``slack``, so that a lane just kept is not left at once: hysteresis).
        redials: fresh connections dialled after the first before the last one is kept whatever
            its pod holds (each costs a TCP and HTTP/2 handshake, about 2 ms).
        leave_damping: the share of a pod's excess that its clients move per check (below 1:
            the clients decide alone, and each sees the excess before the others have moved).
        move_damping: the same for a move to a hole (see :meth:`move_probability`); 0: no
            moves, only leaves.
    """

    slack: float = 0.05
    leave_slack: float = 0.2
    redials: int = 4
    leave_damping: float = 0.5
    move_damping: float = 0.25

    def __post_init__(self) -> None:
        if self.slack < 0 or self.leave_slack < self.slack or self.redials < 0:
            raise ConfigurationError(
                "SubsetRule needs 0 <= slack <= leave_slack and redials >= 0, got "
                f"slack={self.slack}, leave_slack={self.leave_slack}, redials={self.redials}"
            )
        if not 0 < self.leave_damping <= 1:
            raise ConfigurationError(f"leave_damping must be in (0, 1], got {self.leave_damping}")
        if not 0 <= self.move_damping <= 1:
            raise ConfigurationError(f"move_damping must be in [0, 1], got {self.move_damping}")

    def limit(self, mean: float) -> float:
        """The most connections a pod may hold for a fresh connection to it to be kept."""
        return max((1 + self.slack) * mean, mean + 1)

    def leave_limit(self, mean: float) -> float:
        """Above this many connections a pod's lanes may leave it (:meth:`leave_probability`);
        at most this many, they may move to a pod holding fewer (:meth:`move_probability`)."""
        return (1 + self.leave_slack) * mean

    def accepts(self, connections: float, mean: float | None, attempt: int) -> bool:
        """Keep a fresh connection (``attempt`` redials came before it) to a pod that reports
        ``connections`` (this one included)? Without a mean (no reports yet) it is kept."""
        if mean is None or attempt >= self.redials:
            return True
        return connections <= self.limit(mean)

    def leave_probability(self, connections: float, mean: float | None) -> float:
        """The chance that one lane on a pod holding ``connections`` should leave it now.

        Summed over the pod's lanes it is ``leave_damping`` times the excess over the mean,
        so the clients there move about that many lanes between them without talking.
        """
        if mean is None or connections <= 0 or connections <= self.leave_limit(mean):
            return 0.0
        return min(1.0, self.leave_damping * (connections - mean) / connections)

    def move_probability(
        self, connections: float, mean: float | None, least: float | None
    ) -> float:
        """The chance that one lane on a pod holding ``connections`` tries to move now to a
        pod holding fewer, when ``least`` (the fewest any pod the client knows of holds) is at
        least 2 below it and below the mean: a lane moved from ``connections`` to ``least``
        leaves both nearer the mean. Only above the mean, and not above the leave threshold
        (that is :meth:`leave_probability`'s). Summed over the pod's lanes it is
        ``move_damping`` times the excess: with several pods above the mean and one hole, the
        hole is filled over a few checks, not by a herd in one.
        """
        if (
            mean is None
            or least is None
            or connections <= mean
            or least >= mean
            or connections - least < 2
            or connections > self.leave_limit(mean)
        ):
            return 0.0
        return min(1.0, self.move_damping * (connections - mean) / connections)

    def improves(self, connections: float, left: float, mean: float | None) -> bool:
        """Keep a move's fresh connection to a pod that holds ``connections`` (this one
        included), away from a pod that held ``left`` (the moving lane included)? Only if the
        new pod holds fewer than the old one did and no more than a fresh dial may reach."""
        if mean is None:
            return False
        return connections <= left - 1 and connections <= self.limit(mean)


@dataclass(frozen=True)
class PodReport:
    """What a pod last said of its load: the client connections it holds, and its utilization
    (0..1 of its capacity) if it says, at the client's clock ``at``."""

    connections: float
    utilization: float | None
    at: float


class LoadBook:
    """The last report of each pod a client reached, for estimating the fleet's mean.

    Reports older than ``ttl_s`` no longer count: a pod's count drifts as clients come and go.
    """

    __slots__ = ("_reports", "ttl_s")

    def __init__(self, ttl_s: float = 30.0) -> None:
        if ttl_s <= 0:
            raise ConfigurationError(f"LoadBook needs ttl_s > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._reports: dict[str, PodReport] = {}

    def __repr__(self) -> str:
        return f"<LoadBook {len(self._reports)} pods, ttl {self.ttl_s:g} s>"

    def __len__(self) -> int:
        return len(self._reports)

    def record(
        self, pod: str, connections: float, now: float, utilization: float | None = None
    ) -> None:
        self._reports[pod] = PodReport(connections, utilization, now)

    def get(self, pod: str, now: float) -> PodReport | None:
        """``pod``'s last report, if it has not expired."""
        report = self._reports.get(pod)
        if report is None or now - report.at > self.ttl_s:
            return None
        return report

    def forget(self, pod: str) -> None:
        self._reports.pop(pod, None)

    def mean_connections(self, now: float) -> float | None:
        """The mean of the unexpired reports' connections; None without any. Expired reports
        are dropped here, so the book stays as large as the pods reached within ``ttl_s``."""
        total = 0.0
        count = 0
        stale: list[str] = []
        for pod, report in self._reports.items():
            if now - report.at > self.ttl_s:
                stale.append(pod)
            else:
                total += report.connections
                count += 1
        for pod in stale:
            del self._reports[pod]
        return total / count if count else None

    def least_connections(self, now: float) -> float | None:
        """The fewest connections an unexpired report gives; None without any."""
        counts = [r.connections for r in self._reports.values() if now - r.at <= self.ttl_s]
        return min(counts) if counts else None


def rendezvous_rank(seed: str, pods: Iterable[str]) -> list[str]:
    """The pods in the order of a client's preference: highest rendezvous hash first.

    gRFC A68's random subsetting: each client draws its own ``seed`` once, and every pod's
    weight is a hash of (seed, pod). A pod joining or leaving changes no other pod's weight,
    so only the lanes that must move move.
    """

    def weight(pod: str) -> bytes:
        return hashlib.blake2b(f"{seed}\x00{pod}".encode(), digest_size=8).digest()

    return sorted(pods, key=weight, reverse=True)


def rendezvous_subset(
    seed: str,
    pods: Sequence[str],
    size: int,
    rule: SubsetRule | None = None,
    connections: Callable[[str], float | None] | None = None,
    mean: float | None = None,
) -> list[str]:
    """The ``size`` pods a client with ``seed`` keeps lanes on, where pod addresses are known.

    Without a rule it is A68's subset (the first ``size`` in :func:`rendezvous_rank` order). With
    a rule, ``connections`` (a pod's reported count, None if unknown) and the fleet ``mean``, a
    pod the rule would not keep a fresh connection to is skipped for the next in order
    (consistent hashing with bounded loads); if too few are left the skipped ones fill in, in
    order. ``connections`` should not count a lane this client already holds on the pod.
    """
    if size < 1:
        raise ConfigurationError(f"rendezvous_subset needs size >= 1, got {size}")
    ranked = rendezvous_rank(seed, pods)
    if rule is None or connections is None or mean is None:
        return ranked[:size]
    kept: list[str] = []
    skipped: list[str] = []
    for pod in ranked:
        count = connections(pod)
        # +1: the lane this client would add.
        if count is None or rule.accepts(count + 1, mean, 0):
            kept.append(pod)
        else:
            skipped.append(pod)
        if len(kept) == size:
            return kept
    return kept + skipped[: size - len(kept)]
