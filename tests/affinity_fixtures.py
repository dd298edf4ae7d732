"""Shared by the affinity tests: pods that stamp odd headers, and one-call runners."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from calls import Seen, call_aio, call_sync
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import server as sync_server
from grpc_balance_mw.affinity import AffinityConfig
from grpc_balance_mw.aio import interceptors as aio_client
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.interceptors import AffinityInterceptor
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.testing.charge_points.servicer import SyncChargePointsServicer
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

#: For tests that count calls from the first one: no warm-up (``AffinityConfig.warmup_s``).
NO_WARMUP = AffinityConfig(warmup_s=0)

ENVOY_HEADERS = (("server", "envoy"), ("x-envoy-upstream-service-time", "2"))
#: The two ways to observe a sync channel: ``grpc.intercept_channel`` with AffinityInterceptor,
#: or the ObservedChannel wrapper from ``observe_channel``.
SYNC_WRAPPERS = ("interceptor", "channel")
#: Every way to observe a channel: the sync interceptor, the sync wrapper, the aio interceptors.
MODES = ("sync", "channel", "aio")


def observe_sync(channel: grpc.Channel, target: str, wrapper: str, **kwargs: Any) -> Any:
    """``channel`` observed by ``wrapper`` (see SYNC_WRAPPERS, or a mode); it has ``.detector``.

    Returns:
        (the observed channel, the object that has the detector)
    """
    # One loopback pod stands for a pinned ClusterIP here: the default probe's fresh
    # connections, all on that pod, would rightly blame ClientIP affinity instead.
    kwargs.setdefault("probe", False)
    if wrapper == "channel":
        observed = observe(channel, ObserveOptions(**kwargs), target=target)
        return observed, observed
    interceptor = AffinityInterceptor(target, ObserveOptions(**kwargs))
    return grpc.intercept_channel(channel, interceptor), interceptor


class _HeaderServicer(SyncChargePointsServicer):
    """Sends ``headers`` as initial metadata on GetChargePoint."""

    def __init__(self, pod_name: str, headers: Sequence[tuple[str, str]]) -> None:
        super().__init__(pod_name)
        self.headers = tuple(headers)

    def GetChargePoint(self, request: Any, context: grpc.ServicerContext) -> pb.ChargePoint:
        context.send_initial_metadata(self.headers)
        return super().GetChargePoint(request, context)


class HeaderPod:
    """A sync pod on loopback that stamps ``headers``, with or without the identity middleware."""

    def __init__(
        self, headers: Sequence[tuple[str, str]] = (), identity: PodIdentity | None = None
    ) -> None:
        interceptors = [sync_server.PodIdentityInterceptor(identity)] if identity else []
        self.server = server_with_own_workers(4, interceptors=interceptors)
        pb_grpc.add_ChargePointsServicer_to_server(
            _HeaderServicer(identity.name if identity else "anonymous", headers), self.server
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(None).wait()  # and its workers end


async def call_twice(
    mode: str, target: str, kind: str, fail: int, **interceptor_kwargs: Any
) -> tuple[Seen, Seen, Any]:
    """A call on a bare channel and one observed the ``mode`` way (see MODES).

    Returns:
        What each call saw, and the interceptor or observed channel (it has ``.detector``).
    """
    if mode in SYNC_WRAPPERS or mode == "sync":

        def run() -> tuple[Seen, Seen, Any]:
            with grpc.insecure_channel(target) as bare:
                observed, watcher = observe_sync(bare, target, mode, **interceptor_kwargs)
                seen_bare = call_sync(bare, kind, fail)
                seen = call_sync(observed, kind, fail)
            return seen_bare, seen, watcher

        return await asyncio.to_thread(run)
    interceptor = aio_client.AffinityInterceptors(target, ObserveOptions(**interceptor_kwargs))
    async with grpc.aio.insecure_channel(target) as bare:
        seen_bare = await call_aio(bare, kind, fail)
    async with grpc.aio.insecure_channel(target, interceptors=interceptor.interceptors) as channel:
        seen = await call_aio(channel, kind, fail)
        await interceptor.settle()
    return seen_bare, seen, interceptor
