"""Moving an observed ``grpc.aio`` channel's calls onto lanes: the aio driver of
:mod:`grpc_balance_mw.rebalance`.

The settings (:class:`~grpc_balance_mw.rebalance.Rebalance`), the decision and the methods that
follow the move are the sync driver's; here a task on the event loop looks at the detector and
the move opens a :class:`~grpc_balance_mw.aio.balanced.BalancedChannel`. The factory makes
``grpc.aio`` channels: ``factory(extra_options, interceptors)``, as
:func:`grpc_balance_mw.aio.channel_factory` makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from grpc_balance_mw._routing import MethodSpec
from grpc_balance_mw.aio.balanced import BalancedChannel
from grpc_balance_mw.call_kinds import AIO_MULTICALLABLES, by_response, kind_classes
from grpc_balance_mw.rebalancing import RebalanceCore, Rerouted

__all__ = ["Rebalancer", "rerouted"]


class _Rerouted(Rerouted):
    _rebalancer: Rebalancer

    def _route(self) -> Any:
        rebalancer = self._rebalancer
        if rebalancer.balanced is None:
            rebalancer.watch()  # observed outside a loop: this call's loop is the channel's
            return self._here
        return super()._route()


class Rebalancer(RebalanceCore):
    """The aio driver: a task looks at the detector and opens an aio balanced channel when it
    is time. The task starts on the loop running when the channel is observed, or with the
    first call; it belongs to that loop, as the channels do."""

    _FORM = "grpc.aio"
    _BALANCED = BalancedChannel
    _REROUTED = kind_classes(by_response(_Rerouted, _Rerouted), AIO_MULTICALLABLES)
    _watcher: asyncio.Task[None] | None = None

    def _watch_from_now(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: the first call starts it
            self.watch()

    def watch(self) -> None:
        """Start looking at the detector, on the running loop (once)."""
        if self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name=f"rebalance {self.target}"
            )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.rebalance.check_interval_s)
            if self.look():
                return

    async def close(self, grace: float | None = None) -> None:
        """Stop watching and close the lanes, if calls moved onto them."""
        balanced = self._take()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if balanced is not None:
            await balanced.close(grace)


def rerouted(
    here: Any,
    rebalancer: Rebalancer,
    kind: str,
    method: str,
    serializers: tuple[Any, Any],
    registered: bool | None,
) -> Any:
    """A method of an observed aio channel that follows the move (``here`` until then)."""
    return rebalancer.rerouted(here, MethodSpec(kind, method, *serializers, bool(registered)))
