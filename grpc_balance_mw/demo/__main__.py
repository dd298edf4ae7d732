"""``python -m grpc_balance_mw.demo``: the demo job.

For now it starts one charge-points pod with the server middleware, makes one call of each kind
and prints which pod the response headers name. The cluster demo (pinning through a Service,
detection and the fixes) replaces it as those capabilities land.
"""

from __future__ import annotations

import asyncio

import grpc

from grpc_balance_mw.aio.server import PodIdentityInterceptor, add_health
from grpc_balance_mw.demo.servicer import SERVICE_NAME, ChargePointsServicer, meter_values
from grpc_balance_mw.demo.v1 import charge_points_pb2 as pb
from grpc_balance_mw.demo.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.identity import PodIdentity, pod_from_metadata


async def main() -> None:
    identity = PodIdentity("charge-points-0", "127.0.0.1", "ev")
    server = grpc.aio.server(interceptors=[PodIdentityInterceptor(identity)])
    pb_grpc.add_ChargePointsServicer_to_server(ChargePointsServicer(identity.name), server)
    await add_health(server, services=(SERVICE_NAME,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ChargePointsStub(channel)
        calls = {
            "GetChargePoint (unary)": stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1")),
            "WatchStatus (server stream)": stub.WatchStatus(pb.WatchStatusRequest(updates=2)),
            "UploadMeterValues (client stream)": stub.UploadMeterValues(meter_values(3)),
            "Session (bidi)": stub.Session(iter([pb.SessionMessage(command="start")])),
        }
        for name, call in calls.items():
            if hasattr(call, "__aiter__"):
                [_ async for _ in call]
            else:
                await call
            pod = pod_from_metadata(await call.initial_metadata())
            code = await call.code()
            print(f"omni -> charge-points {name:34} served by {pod!s:16} {code.name}")
    await server.stop(None)


if __name__ == "__main__":
    asyncio.run(main())
