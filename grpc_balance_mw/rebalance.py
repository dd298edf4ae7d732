"""Moving an observed channel's calls onto lanes: the remedy for clients that cannot change how
their channel is made.

``observe(channel, options, rebalance=Rebalance(factory))`` keeps calling through ``channel``
until the target's affinity detector raises its alarm (pinned or skewed; or at once with
``when="always"``), then opens a balanced channel from ``factory`` and sends every later call of
every method, stubs made before included, to its lanes. The wrapper is a channel, so it holds
each method's serializers: what a ``grpc.intercept_channel`` interceptor never sees and could not
re-send elsewhere. The move is one-way: calls already under way finish on the original channel,
which stays open until the wrapper is closed; closing the wrapper closes the lanes.

One core for both forms (:mod:`grpc_balance_mw.rebalancing`, re-exported here):
:class:`Rebalance` (the settings), :class:`RebalanceCore` (when to move, the pool the lanes
get, what the detector is told, which methods follow) and :class:`Rerouted` (a method that
follows the move) are shared by the sync driver here
(:class:`Rebalancer`: a watcher thread and a :class:`~grpc_balance_mw.balanced.BalancedChannel`)
and the ``grpc.aio`` one (:class:`grpc_balance_mw.aio.rebalance.Rebalancer`: a watcher task and
an aio balanced channel). The calls that moved are the balanced channel's: its routing core
(:mod:`grpc_balance_mw.routed_channel`) attempts, retries and releases them.
"""

from __future__ import annotations

import threading
from typing import Any

from grpc_balance_mw.balanced import BalancedChannel
from grpc_balance_mw.call_kinds import SYNC_MULTICALLABLES, by_response, kind_classes
from grpc_balance_mw.rebalancing import Rebalance, RebalanceCore, Rerouted

__all__ = ["Rebalance", "RebalanceCore", "Rebalancer", "Rerouted"]


class _ReroutedUnaryResponse(Rerouted):
    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._route().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._route().future(*args, **kwargs)


class Rebalancer(RebalanceCore):
    """The sync driver: a thread looks at the detector and opens a
    :class:`~grpc_balance_mw.balanced.BalancedChannel` when it is time."""

    _BALANCED = BalancedChannel
    _REROUTED = kind_classes(by_response(_ReroutedUnaryResponse, Rerouted), SYNC_MULTICALLABLES)
    _watcher: threading.Thread | None = None

    def _watch_from_now(self) -> None:
        self._watcher = threading.Thread(
            target=self._watch, name=f"rebalance {self.target}", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.rebalance.check_interval_s):
            if self.look():
                return

    def close(self) -> None:
        """Stop watching and close the lanes, if calls moved onto them."""
        balanced = self._take()
        if balanced is not None:
            balanced.close()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=5)
