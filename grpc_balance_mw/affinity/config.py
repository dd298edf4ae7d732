"""The affinity detector's thresholds and windows, with the reasoning behind each default."""

from __future__ import annotations

from dataclasses import dataclass

from grpc_balance_mw.errors import ConfigurationError


@dataclass(frozen=True)
class AffinityConfig:
    """How one target's calls are judged. Every default is chosen so a healthy spread never alarms.

    Attributes:
        window_calls: the window holds at most this many calls. 240 calls over 3 pods puts each
            pod's share of a fair spread within a few points of 1/3, far below the skew line.
            240 is a multiple of every pod count from 1 to 6 (and of 8, 10, 12): when lanes
            take turns on their pods, the call that leaves a full window is on the pod of the
            one that comes, the totals stay, and the verdict is not worked out again (a third
            of the judging's cost per call with 3 lanes; 200 missed this for 3 and 6 pods).
        window_s: and only calls from the last this many seconds, so an old pinning that a
            reconnect fixed stops counting within a minute.
        min_samples: no state is decided on fewer identified calls than this; 20 calls all on one
            pod out of 3 happen by chance with probability (1/3)**19, about 1e-9.
        stream_unit_s: a stream weighs ``max(1, duration / stream_unit_s)`` calls, so one stream
            held open for minutes on one pod counts for what it really costs that pod.
        pinned_enter_share: pinned when the top pod has at least this share of the window and two
            or more pods are known; 0.95 tolerates a few calls that reached another pod during a
            reconnect.
        pinned_exit_share: and stays pinned until the share falls below this (hysteresis).
        skew_enter_excess: skewed when the top share is at least
            ``fair + skew_enter_excess * (1 - fair)`` with ``fair = 1 / known pods``: 0.67 for 3
            pods, 0.75 for 2, 0.55 for 10 -- halfway from a fair share to pinned.
        skew_exit_excess: the same formula for leaving skewed (0.53 for 3 pods).
        dwell_calls: a new state is taken only after this many calls in a row agree with it, so
            one unlucky stretch does not flap the state (and its alarm) back and forth.
        l7_enter_share: L7-balanced when at least this share of the window carried an L7 proxy's
            response headers (Envoy's ``server: envoy``, ``x-envoy-upstream-service-time``).
        known_pods_ttl_s: an upper bound: a pod that nothing confirmed (no call, probe round or
            lane's check reached it) for this long stops counting. Pods leave on evidence well
            before that (see :mod:`grpc_balance_mw._membership`: gone from a DNS answer, calls
            failing UNAVAILABLE, fresh connections that keep missing it, a balanced channel's
            lane finding it NOT_SERVING); ten minutes outlives the default probe's interval, so
            a pinned channel still counts the pods its probe found.
        max_known_pods: at most this many pods are known at once. A server that names a new pod
            on every call would otherwise grow the known pods (and the client's memory) for
            ``known_pods_ttl_s``; past the bound, the pods seen longest ago are forgotten (half
            of them at once, so the cost per call stays O(1)) and the snapshot counts them in
            ``known_pods_dropped``. 256 is above ``window_calls`` (every pod in a window can be
            known) and above any Deployment this package has been pointed at; with more pods
            than that a fair share is below 0.4 % anyway.
        expected_pods: the pod count the operator expects (e.g. the Deployment's replicas), if
            known; with it, a single channel's pinning is recognised without any probe.
        warmup_s: the longest a channel's (lane's) warm-up lasts, from its first call; warm-up
            calls teach the known pods but do not count toward shares. The warm-up is tied to its
            cause: a target that names one address (an IP literal, a resolved ClusterIP name) has
            none, it is judged from the first call; a name that resolves to several addresses
            warms up until the lane has seen as many pods as it can reach (``round_robin`` sends
            a new channel's first calls to whichever subchannel connected first: seen here, the
            first 45 of 60 calls on one of 3 pods) or this long passed; a name not resolved yet
            warms up for this long. 0 judges every lane from its first call.
        chance_alpha: connections are the evidence, not calls: an alarm that rests on where
            connections landed needs that spread to be at most this likely by chance: 10 fresh
            connections all on one of 3 pods (1 in 19,683), 16 of 23 on one (a binomial tail).
            Each new connection is another look at the figures, so the line is low: at 1e-3, 30
            fresh channels over 3 pods alarmed in 1 of 200 runs; at 1e-4 in none of 2,000. One
            lane with ``min_samples`` calls in a row on one pod is evidence of pinning on its own.
    """

    window_calls: int = 240
    window_s: float = 60.0
    min_samples: int = 20
    stream_unit_s: float = 1.0
    pinned_enter_share: float = 0.95
    pinned_exit_share: float = 0.80
    skew_enter_excess: float = 0.5
    skew_exit_excess: float = 0.3
    dwell_calls: int = 10
    l7_enter_share: float = 0.5
    known_pods_ttl_s: float = 600.0
    max_known_pods: int = 256
    expected_pods: int | None = None
    warmup_s: float = 1.0
    chance_alpha: float = 1e-4

    def __post_init__(self) -> None:
        checks = (
            (self.window_calls >= 1, "window_calls must be >= 1"),
            (self.window_s > 0, "window_s must be > 0"),
            (1 <= self.min_samples <= self.window_calls, "min_samples must be in 1..window_calls"),
            (self.stream_unit_s > 0, "stream_unit_s must be > 0"),
            (
                0 < self.pinned_exit_share <= self.pinned_enter_share <= 1,
                "need 0 < pinned_exit_share <= pinned_enter_share <= 1",
            ),
            (
                0 < self.skew_exit_excess <= self.skew_enter_excess < 1,
                "need 0 < skew_exit_excess <= skew_enter_excess < 1",
            ),
            (self.dwell_calls >= 1, "dwell_calls must be >= 1"),
            (0 < self.l7_enter_share <= 1, "l7_enter_share must be in (0, 1]"),
            (self.known_pods_ttl_s > 0, "known_pods_ttl_s must be > 0"),
            (self.max_known_pods >= 2, "max_known_pods must be >= 2 (pinned needs two pods)"),
            (self.warmup_s >= 0, "warmup_s must be >= 0"),
            (0 < self.chance_alpha < 1, "chance_alpha must be in (0, 1)"),
            (
                self.expected_pods is None or self.expected_pods >= 1,
                "expected_pods must be >= 1 or None",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigurationError(f"AffinityConfig: {message}")
