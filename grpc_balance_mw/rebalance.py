"""Moving an observed channel's calls onto lanes: the remedy for clients that cannot change how
their channel is made.

``observe(channel, options, rebalance=Rebalance(factory))`` keeps calling through ``channel``
until the target's affinity detector raises its alarm (pinned or skewed; or at once with
``when="always"``), then opens a :class:`~grpc_balance_mw.channel.BalancedChannel` from
``factory`` and sends every later call of every method, stubs made before included, to its lanes.
The wrapper is a ``grpc.Channel``, so it holds each method's serializers: what a
``grpc.intercept_channel`` interceptor never sees and could not re-send elsewhere. The move is
one-way: calls already under way finish on the original channel, which stays open until the
wrapper is closed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observing import ObserveOptions

__all__ = ["Rebalance", "Rebalancer"]

_log = logging.getLogger(__name__)

ChannelFactory = Callable[[Sequence[tuple[str, Any]]], grpc.Channel]


@dataclass(frozen=True)
class Rebalance:
    """When and how an observed channel moves its calls onto lanes.

    Attributes:
        factory: makes one more channel like the user's, given extra channel options (each lane
            adds ``grpc.use_local_subchannel_pool`` so it gets a connection of its own), e.g.
            ``lambda extra: grpc.secure_channel(target, creds, options=[*mine, *extra])``.
        when: ``"alarm"``: once the detector says pinned or skewed; ``"always"``: from the start.
        lanes: lanes kept at least (see ``balanced_channel``).
        max_lanes: lanes kept at most while following the pods known.
        picker: the lane per call (``LeastOutstanding()`` by default).
        rotation: when lanes are replaced (the balanced channel's default by default).
        check_interval_s: how often the detector's state is looked at (off the call path).
    """

    factory: ChannelFactory
    when: Literal["alarm", "always"] = "alarm"
    lanes: int = 3
    max_lanes: int = 8
    picker: Any = None
    rotation: Any = None
    check_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if not callable(self.factory):
            raise ConfigurationError("Rebalance: factory must be a callable making a channel")
        if self.when not in ("alarm", "always"):
            raise ConfigurationError("Rebalance: when must be 'alarm' or 'always'")
        if self.check_interval_s <= 0:
            raise ConfigurationError("Rebalance: check_interval_s must be > 0")


class Rebalancer:
    """Watches one observed channel's detector and opens the lanes when it is time."""

    def __init__(
        self,
        target: str,
        detector: AffinityDetector,
        options: ObserveOptions,
        rebalance: Rebalance,
    ) -> None:
        self.target = target
        self.detector = detector
        self.rebalance = rebalance
        self._options = options
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: The balanced channel calls go to once moved; None until then.
        self.balanced: grpc.Channel | None = None
        self._watcher: threading.Thread | None = None
        if rebalance.when == "always":
            self.activate("asked to always")
        else:
            self._watcher = threading.Thread(
                target=self._watch, name=f"rebalance {target}", daemon=True
            )
            self._watcher.start()

    def __repr__(self) -> str:
        moved = "on lanes" if self.balanced is not None else "watching"
        return f"<Rebalancer {self.target} {moved}>"

    def _watch(self) -> None:
        while not self._stop.wait(self.rebalance.check_interval_s):
            state = self.detector.state
            if state.is_alarm:
                self.activate(f"the affinity detector says {state.value}")
                return

    def activate(self, why: str) -> None:
        """Open the lanes (once); later calls go to them."""
        from grpc_balance_mw.channel import BalancedChannel  # it observes lanes with this module
        from grpc_balance_mw.pool.pool import pool_for_channel

        with self._lock:
            if self.balanced is not None or self._stop.is_set():
                return
            rebalance = self.rebalance
            pool = pool_for_channel(
                lanes=rebalance.lanes,
                max_lanes=rebalance.max_lanes,
                follow_pods=True,
                expected_pods=self._options.expected_pods,
                pool_config=None,
                picker=rebalance.picker,
                rotation=rebalance.rotation,
            )
            self.balanced = BalancedChannel(
                rebalance.factory, self.target, pool=pool, observe=self._options
            )
        _log.warning(
            "grpc_balance_mw: calls to %s move onto %d+ connections of their own (%s)",
            self.target,
            rebalance.lanes,
            why,
        )

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            balanced, self.balanced = self.balanced, None
        if balanced is not None:
            balanced.close()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)
