"""The ``grpc.aio`` forms of the observing strategies, for ``bench``'s membership scenarios.

* ``aio-interceptors``: a ``grpc.aio`` channel through the Service, observed
  (:func:`grpc_balance_mw.aio.observed_channel.observe`), optionally with Rebalance;
* ``aio-balanced``: :func:`grpc_balance_mw.aio.balanced_channel`, GetChargePoint retryable.

Each channel lives on an event loop of its own, run by a thread; the scenario's sync loops call
through it (:class:`_Stub`), so one scenario drives the sync and the aio forms alike and reads
the same detector and pool. Only the unary GetChargePoint goes through (what the membership
scenarios call).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio import balanced_channel, channel_factory
from grpc_balance_mw.aio.observed_channel import observe
from grpc_balance_mw.cli import AIO_STRATEGIES
from grpc_balance_mw.cli.strategies import GET_CHARGE_POINT, OWN_CONNECTION, Opened
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.retry import RetryPolicy
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

__all__ = ["AIO_STRATEGIES", "open_aio_strategy"]

T = TypeVar("T")


class _Loop:
    """An event loop run by a thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class _Stub:
    """GetChargePoint on an aio stub, called from a sync thread."""

    def __init__(self, loop: _Loop, stub: Any) -> None:
        self._loop = loop
        self._stub = stub

    def GetChargePoint(self, request: pb.GetChargePointRequest, timeout: float) -> pb.ChargePoint:
        async def call() -> pb.ChargePoint:
            response: pb.ChargePoint = await self._stub.GetChargePoint(request, timeout=timeout)
            return response

        return self._loop.run(call(), timeout + 5)


def open_aio_strategy(name: str, cluster: LocalCluster, *, rebalance: bool = False) -> Opened:
    """Open one of :data:`AIO_STRATEGIES` with default options (a registry of its own aside).

    Args:
        name: ``aio-interceptors`` or ``aio-balanced``.
        cluster: the cluster whose Service it reaches.
        rebalance: ``aio-interceptors`` only: with ``Rebalance(channel_factory(target))``.
    """
    if name not in AIO_STRATEGIES:
        raise ValueError(f"unknown aio strategy {name!r}")
    target = cluster.service_target
    options = ObserveOptions(registry=AffinityRegistry())
    loop = _Loop(f"bench {name}")

    async def make() -> Any:
        if name == "aio-balanced":
            retry = RetryPolicy(methods={GET_CHARGE_POINT})
            return balanced_channel(target, retry=retry, observe=options)
        moves = Rebalance(channel_factory(target)) if rebalance else None
        plain = grpc.aio.insecure_channel(target, options=[OWN_CONNECTION])
        return observe(plain, options, target=target, rebalance=moves)

    channel = loop.run(make(), 30)

    def close() -> None:
        try:
            loop.run(channel.close(), 30)
        finally:
            loop.stop()

    stub = _Stub(loop, pb_grpc.ChargePointsStub(channel))  # type: ignore[no-untyped-call]
    return Opened(name, channel, stub, cluster, channel.detector, close)
