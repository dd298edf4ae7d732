"""What the dial-per-request tests share: a pod that records each call's peer, a sync/aio driver,
and real TLS certificates made with the openssl CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from calls import Seen, call_aio, call_sync
from leak_fixtures import server_with_own_workers

from grpc_balance_mw import dial_per_request as redial
from grpc_balance_mw import server as sync_server
from grpc_balance_mw.aio import dial_per_request as aio_redial
from grpc_balance_mw.identity import PodIdentity
from grpc_balance_mw.testing.charge_points.servicer import SERVICE_NAME, SyncChargePointsServicer
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

GET = f"/{SERVICE_NAME}/GetChargePoint"
UPLOAD = f"/{SERVICE_NAME}/UploadMeterValues"
WATCH = f"/{SERVICE_NAME}/WatchStatus"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@dataclass
class Attempt:
    method: str
    peer: str
    time_remaining: float | None
    security: list[bytes] = field(default_factory=list)


class PeerServicer(SyncChargePointsServicer):
    """Records every call's peer (one per TCP connection), deadline and transport security;
    the next ``unavailable`` GetChargePoint calls fail with UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__("redial-pod")
        self.attempts: list[Attempt] = []
        self.unavailable = 0
        self.unavailable_streams = 0  # WatchStatus calls to fail before their first message
        self._lock = threading.Lock()

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        security = context.auth_context().get("transport_security_type", [])
        with self._lock:
            self.attempts.append(
                Attempt(method, context.peer(), context.time_remaining(), list(security))
            )

    def of(self, method: str) -> list[Attempt]:
        with self._lock:
            return [a for a in self.attempts if a.method == method]

    def GetChargePoint(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record(GET, context)
        with self._lock:
            fail = self.unavailable > 0
            self.unavailable -= fail
        if fail:
            context.abort(UNAVAILABLE, "scripted outage")
        return super().GetChargePoint(request, context)

    def WatchStatus(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record(WATCH, context)
        with self._lock:
            fail = self.unavailable_streams > 0
            self.unavailable_streams -= fail
        if fail:
            context.abort(UNAVAILABLE, "scripted outage")
        yield from super().WatchStatus(request, context)

    def UploadMeterValues(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        self._record(UPLOAD, context)
        return super().UploadMeterValues(request_iterator, context)

    def Session(self, request_iterator: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record(f"/{SERVICE_NAME}/Session", context)
        yield from super().Session(request_iterator, context)


class PeerPod:
    """A sync server on loopback (plaintext, or TLS with ``server_credentials``), on ``port``
    (0: any free one)."""

    def __init__(
        self, server_credentials: grpc.ServerCredentials | None = None, port: int = 0
    ) -> None:
        identity = PodIdentity(name="redial-pod", ip="10.244.9.9", namespace="ev")
        self.server = server_with_own_workers(
            8, interceptors=[sync_server.PodIdentityInterceptor(identity)]
        )
        self.servicer = PeerServicer()
        pb_grpc.add_ChargePointsServicer_to_server(self.servicer, self.server)
        self.health = sync_server.add_health(self.server, services=(SERVICE_NAME,))
        if server_credentials is None:
            self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            self.port = self.server.add_secure_port(f"127.0.0.1:{port}", server_credentials)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"

    def peers(self, method: str = GET) -> set[str]:
        return {a.peer for a in self.servicer.of(method)}

    def stop(self) -> None:
        self.server.stop(None).wait()  # and its workers end


class Driver:
    """Makes the same calls through the sync or the aio dial-per-request channel."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = asyncio.new_event_loop() if mode == "aio" else None

    def run(self, coro: Any) -> Any:
        assert self.loop is not None
        return self.loop.run_until_complete(coro)

    def channel(self, target: str, credentials: Any = None, **kwargs: Any) -> Any:
        if self.loop is None:
            return redial.dial_per_request_channel(target, credentials, **kwargs)

        async def make() -> Any:
            return aio_redial.dial_per_request_channel(target, credentials, **kwargs)

        return self.run(make())

    def call(
        self, channel: Any, kind: str = "unary_unary", timeout: float = 10, fail: int = 0
    ) -> Seen:
        if self.loop is None:
            return call_sync(channel, kind, fail, timeout)
        return self.run(call_aio(channel, kind, fail, timeout))  # type: ignore[no-any-return]

    def upload(self, channel: Any, request: Any, timeout: float = 10) -> grpc.StatusCode:
        """UploadMeterValues with the request as given (a list, or an iterator)."""
        stub = pb_grpc.ChargePointsStub(channel)
        if self.loop is None:
            try:
                stub.UploadMeterValues(request, timeout=timeout)
            except grpc.RpcError as error:
                return error.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

        async def upload() -> grpc.StatusCode:
            call = stub.UploadMeterValues(request, timeout=timeout)
            try:
                await call
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        return self.run(upload())  # type: ignore[no-any-return]

    def ready(self, channel: Any) -> int:
        if self.loop is not None:
            self.run(asyncio.sleep(0.01))  # the predial task runs only while the loop does
        return channel.ready()  # type: ignore[no-any-return]

    def stats(self, channel: Any) -> tuple[int, int, int]:
        """(dialled, predialled, closed)."""
        if self.loop is not None:
            self.run(asyncio.sleep(0))
        s = channel.stats
        return s.dialled, s.predialled, s.closed

    def predial_failures(self, channel: Any) -> int:
        if self.loop is not None:
            self.run(asyncio.sleep(0))
        return channel.stats.predial_failures  # type: ignore[no-any-return]

    def close(self, channel: Any) -> None:
        if self.loop is None:
            channel.close()
        else:
            self.run(channel.close())

    def finish(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


def open_fds() -> dict[int, str]:
    """This process's open descriptors and what each is: a TCP socket as its two ends and
    state (from /proc/net/tcp and tcp6), anything else as its link; for naming what a leak
    test found left open."""
    sockets: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            ports = f"{int(local.split(':')[1], 16)}->{int(remote.split(':')[1], 16)}"
            sockets[f"socket:[{inode}]"] = f"tcp {ports} state {state}"
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile (the listing's own descriptor, for one)
            continue
        found[int(name)] = sockets.get(link, link)
    return found


def fds_left(before: dict[int, str]) -> dict[int, str]:
    """Descriptors open now that were not open (as the same thing) in ``before``."""
    return {fd: what for fd, what in open_fds().items() if before.get(fd) != what}


def wait_until(
    condition: Callable[[], bool], driver: Driver | None = None, limit_s: float = 5
) -> bool:
    """Poll ``condition`` (letting an aio driver's loop run) for at most ``limit_s``."""

    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if condition():
            return True
        if driver is not None and driver.loop is not None:
            driver.run(asyncio.sleep(0.02))
        else:
            time.sleep(0.02)
    return condition()


def get_request() -> Any:
    return pb.GetChargePointRequest(id="cp-1")


@dataclass
class Certificates:
    ca: bytes
    key: bytes
    chain: bytes
    client_key: bytes
    client_chain: bytes


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, both
    signed by the CA (openssl CLI)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=redial-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out",
            "client.csr", "-subj", "/CN=omni")  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "client.pem", "-days", "2")  # fmt: skip
    return Certificates(
        ca=(directory / "ca.pem").read_bytes(),
        key=(directory / "server.key").read_bytes(),
        chain=(directory / "server.pem").read_bytes(),
        client_key=(directory / "client.key").read_bytes(),
        client_chain=(directory / "client.pem").read_bytes(),
    )
