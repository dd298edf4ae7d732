"""Moving an observed ``grpc.aio`` channel's calls onto lanes: the aio driver of
:mod:`grpc_balance_mw.rebalance`.

The settings (:class:`~grpc_balance_mw.rebalance.Rebalance`), the decision and the methods that
follow the move are the sync driver's; here a task on the event loop looks at the detector and
the move opens a :class:`~grpc_balance_mw.aio.channel.BalancedChannel`. The factory makes
``grpc.aio`` channels: ``factory(extra_options, interceptors)``, as
:func:`grpc_balance_mw.aio.channel_factory` makes one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.aio.channel import BalancedChannel
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool
from grpc_balance_mw.rebalance import Rebalance, RebalanceCore, Rerouted

__all__ = ["Rebalancer", "rerouted"]


class Rebalancer(RebalanceCore):
    """The aio driver: a task looks at the detector and opens an aio balanced channel when it
    is time. The task starts on the loop running when the channel is observed, or with the
    first call; it belongs to that loop, as the channels do."""

    def __init__(
        self,
        target: str,
        detector: AffinityDetector,
        options: ObserveOptions,
        rebalance: Rebalance,
    ) -> None:
        rebalance.check_factory((), (), form="grpc.aio")
        super().__init__(target, detector, options, rebalance)
        self._watcher: asyncio.Task[None] | None = None
        why = self.due()
        if why is not None:
            self.activate(why)  # at once, in the caller: a bad factory is the caller's error
        else:
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
            why = self.due()
            if why is not None:
                self._activate_in_background(why)
                return

    def _open(self, pool: LanePool) -> Any:
        rebalance = self.rebalance
        return BalancedChannel(
            rebalance.factory, self.target, pool=pool, observe=self._options, retry=rebalance.retry
        )

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


class _Rerouted(Rerouted):
    _rebalancer: Rebalancer

    def _route(self) -> Any:
        rebalancer = self._rebalancer
        if rebalancer.balanced is None:
            rebalancer.watch()  # observed outside a loop: this call's loop is the channel's
            return self._here
        return super()._route()


class _UnaryUnary(_Rerouted, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    pass


class _UnaryStream(_Rerouted, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    pass


class _StreamUnary(_Rerouted, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    pass


class _StreamStream(_Rerouted, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    pass


_KINDS: dict[str, type[Rerouted]] = {
    "unary_unary": _UnaryUnary,
    "unary_stream": _UnaryStream,
    "stream_unary": _StreamUnary,
    "stream_stream": _StreamStream,
}


def rerouted(
    here: Any,
    rebalancer: Rebalancer,
    kind: str,
    method: str,
    serializers: tuple[Any, Any],
    registered: bool | None,
) -> Any:
    """A method of an observed aio channel that follows the move (``here`` until then)."""
    return _KINDS[kind](here, rebalancer, kind, method, serializers, registered)
