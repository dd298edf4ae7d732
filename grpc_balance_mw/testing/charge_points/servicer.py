"""The charge-points servicer a demo pod runs: service time, capacity, server-side counts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from grpc_balance_mw.aio.server import PodHealth
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2 as admin_pb
from grpc_balance_mw.testing.charge_points.v1 import pod_admin_pb2_grpc as admin_grpc

Overflow = Literal["queue", "reject"]
SERVICE_NAME = "chargepoints.v1.ChargePoints"
_STATUSES = (pb.STATUS_AVAILABLE, pb.STATUS_CHARGING, pb.STATUS_FAULTED)


@dataclass
class PodStats:
    """What one pod served; the ground truth for spread measurements."""

    calls: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    rejected: int = 0
    messages_in: int = 0
    messages_out: int = 0


class Capacity:
    """At most ``max_concurrent`` calls at once (0: unlimited); the rest queue or are rejected."""

    def __init__(self, max_concurrent: int, overflow: Overflow) -> None:
        if max_concurrent < 0:
            raise ConfigurationError(f"max_concurrent must be >= 0, got {max_concurrent}")
        if overflow not in ("queue", "reject"):
            raise ConfigurationError(f"overflow must be 'queue' or 'reject', got {overflow!r}")
        self.max_concurrent = max_concurrent
        self.overflow = overflow
        self.active = 0
        self._freed = asyncio.Condition()

    async def resize(self, max_concurrent: int) -> None:
        """Change the limit; queued calls that now fit start at once."""
        async with self._freed:
            self.max_concurrent = max_concurrent
            self._freed.notify_all()

    def full(self) -> bool:
        return 0 < self.max_concurrent <= self.active

    @contextlib.asynccontextmanager
    async def slot(self, context: grpc.aio.ServicerContext, stats: PodStats) -> AsyncIterator[None]:
        async with self._freed:
            if self.full() and self.overflow == "reject":
                stats.rejected += 1
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"pod at capacity ({self.max_concurrent} concurrent calls)",
                )
            await self._freed.wait_for(lambda: not self.full())
            self.active += 1
        try:
            yield
        finally:
            async with self._freed:
                self.active -= 1
                self._freed.notify()


class ChargePointsServicer(pb_grpc.ChargePointsServicer):
    """All four call kinds; each honours ``fail_with_code`` so error paths can be tested.

    ``fail_with``: every call fails with this status while the pod's health stays SERVING (a
    gray failure: a bad config, a broken dependency); None: calls succeed.
    """

    def __init__(
        self,
        pod_name: str,
        *,
        service_time_s: float = 0.0,
        max_concurrent: int = 0,
        overflow: Overflow = "queue",
        fail_with: grpc.StatusCode | None = None,
    ) -> None:
        self.pod_name = pod_name
        self.fail_with = fail_with
        self.service_time_s = service_time_s
        self.capacity = Capacity(max_concurrent, overflow)
        self.stats = PodStats()

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        self.stats.calls[f"/{SERVICE_NAME}/{method}"] += 1
        async with self.capacity.slot(context, self.stats):
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
            try:
                yield
            finally:
                self.stats.in_flight -= 1

    async def _work(self) -> None:
        if self.service_time_s > 0:
            await asyncio.sleep(self.service_time_s)

    async def _fail_if_asked(self, code: int, context: grpc.aio.ServicerContext) -> None:
        status = _failure(self.fail_with, code)
        if status is not None:
            await context.abort(status, f"failed on request with {status.name}")

    async def GetChargePoint(
        self, request: pb.GetChargePointRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChargePoint:
        async with self._call("GetChargePoint", context):
            await self._work()
            await self._fail_if_asked(request.fail_with_code, context)
            return pb.ChargePoint(
                id=request.id,
                status=_status_for(request.id),
                max_power_kw=150.0,
                served_by=self.pod_name,
            )

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StatusUpdate]:
        async with self._call("WatchStatus", context):
            await self._work()
            for sequence in range(max(request.updates, 1)):
                if sequence:
                    await asyncio.sleep(request.interval_ms / 1000)
                self.stats.messages_out += 1
                yield pb.StatusUpdate(
                    id=request.id,
                    status=_STATUSES[sequence % len(_STATUSES)],
                    sequence=sequence,
                    served_by=self.pod_name,
                )
            await self._fail_if_asked(request.fail_with_code, context)

    async def UploadMeterValues(
        self, request_iterator: AsyncIterator[pb.MeterValue], context: grpc.aio.ServicerContext
    ) -> pb.UploadSummary:
        async with self._call("UploadMeterValues", context):
            count, total = 0, 0.0
            async for value in request_iterator:
                self.stats.messages_in += 1
                await self._fail_if_asked(value.fail_with_code, context)
                count += 1
                total += value.energy_wh
            await self._work()
            return pb.UploadSummary(count=count, total_energy_wh=total, served_by=self.pod_name)

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SessionReply]:
        async with self._call("Session", context):
            sequence = 0
            async for message in request_iterator:
                self.stats.messages_in += 1
                await self._fail_if_asked(message.fail_with_code, context)
                await self._work()
                self.stats.messages_out += 1
                yield pb.SessionReply(
                    charge_point_id=message.charge_point_id,
                    ack=f"ack:{message.command}",
                    sequence=sequence,
                    served_by=self.pod_name,
                )
                sequence += 1


class PodAdminServicer(admin_grpc.PodAdminServicer):
    """Reads and drives one pod for the local cluster (on the pod's own address)."""

    def __init__(self, charge_points: ChargePointsServicer, health: PodHealth) -> None:
        self._cp = charge_points
        self._health = health

    def _snapshot(self) -> admin_pb.PodStats:
        stats = self._cp.stats
        return admin_pb.PodStats(
            pod_name=self._cp.pod_name,
            calls=dict(stats.calls),
            total_calls=sum(stats.calls.values()),
            in_flight=stats.in_flight,
            max_in_flight=stats.max_in_flight,
            rejected=stats.rejected,
            messages_in=stats.messages_in,
            messages_out=stats.messages_out,
            serving=self._health.serving,
            service_time_ms=round(self._cp.service_time_s * 1000),
            max_concurrent=self._cp.capacity.max_concurrent,
        )

    async def GetStats(
        self, request: admin_pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.PodStats:
        snapshot = self._snapshot()
        if request.reset:
            self._cp.stats = PodStats(in_flight=self._cp.stats.in_flight)
        return snapshot

    async def SetServing(
        self, request: admin_pb.SetServingRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.PodStats:
        await self._health.set_serving(request.serving)
        return self._snapshot()

    async def Configure(
        self, request: admin_pb.ConfigureRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb.PodStats:
        if request.service_time_ms >= 0:
            self._cp.service_time_s = request.service_time_ms / 1000
        if request.max_concurrent >= 0:
            await self._cp.capacity.resize(request.max_concurrent)
        return self._snapshot()


def _asked_failure(code: int) -> grpc.StatusCode | None:
    """The status ``fail_with_code`` asks for; a negative code makes the handler raise."""
    if code < 0:
        raise RuntimeError("handler raised on request (fail_with_code < 0)")
    return _status_code(code) if code else None


def _failure(fail_with: grpc.StatusCode | None, code: int) -> grpc.StatusCode | None:
    """The status a call ends with: the pod's own failure if it has one, else the request's."""
    return fail_with if fail_with is not None else _asked_failure(code)


def _status_code(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _status_for(charge_point_id: str) -> Any:
    return _STATUSES[sum(charge_point_id.encode()) % len(_STATUSES)]


class SyncChargePointsServicer(pb_grpc.ChargePointsServicer):
    """The same four calls for a sync ``grpc.server``; a fixed service time, no capacity model."""

    def __init__(
        self,
        pod_name: str,
        *,
        service_time_s: float = 0.0,
        fail_with: grpc.StatusCode | None = None,
    ) -> None:
        self.pod_name = pod_name
        self.service_time_s = service_time_s
        self.fail_with = fail_with
        self.calls: Counter[str] = Counter()

    def _work(self, method: str) -> None:
        self.calls[f"/{SERVICE_NAME}/{method}"] += 1
        if self.service_time_s > 0:
            time.sleep(self.service_time_s)

    def _fail_if_asked(self, code: int, context: grpc.ServicerContext) -> None:
        status = _failure(self.fail_with, code)
        if status is not None:
            context.abort(status, f"failed on request with {status.name}")

    def GetChargePoint(
        self, request: pb.GetChargePointRequest, context: grpc.ServicerContext
    ) -> pb.ChargePoint:
        self._work("GetChargePoint")
        self._fail_if_asked(request.fail_with_code, context)
        return pb.ChargePoint(
            id=request.id,
            status=_status_for(request.id),
            max_power_kw=150.0,
            served_by=self.pod_name,
        )

    def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.StatusUpdate]:
        self._work("WatchStatus")
        for sequence in range(max(request.updates, 1)):
            if sequence:
                time.sleep(request.interval_ms / 1000)
            yield pb.StatusUpdate(
                id=request.id,
                status=_STATUSES[sequence % len(_STATUSES)],
                sequence=sequence,
                served_by=self.pod_name,
            )
        self._fail_if_asked(request.fail_with_code, context)

    def UploadMeterValues(
        self, request_iterator: Iterator[pb.MeterValue], context: grpc.ServicerContext
    ) -> pb.UploadSummary:
        self._work("UploadMeterValues")
        count, total = 0, 0.0
        for value in request_iterator:
            self._fail_if_asked(value.fail_with_code, context)
            count += 1
            total += value.energy_wh
        return pb.UploadSummary(count=count, total_energy_wh=total, served_by=self.pod_name)

    def Session(
        self, request_iterator: Iterator[pb.SessionMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.SessionReply]:
        self._work("Session")
        for sequence, message in enumerate(request_iterator):
            self._fail_if_asked(message.fail_with_code, context)
            yield pb.SessionReply(
                charge_point_id=message.charge_point_id,
                ack=f"ack:{message.command}",
                sequence=sequence,
                served_by=self.pod_name,
            )
