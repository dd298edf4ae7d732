"""The ``userspace`` L4 Service: a per-connection TCP proxy, as kube-proxy's userspace mode was.

Each accepted TCP connection goes to one random ready endpoint for its whole life, which is
exactly what makes one gRPC channel stick to one pod. It runs as its own process
(``python -m grpc_balance_mw.testing.userspace_proxy --listen 127.0.0.1:0``) so it never
shares a GIL with the client under test. It prints ``READY <port>``, then reads control lines
on stdin: ``ENDPOINTS ip:port ...`` replaces the endpoint set and is answered ``OK <n>``.
Established connections are left alone by an update, as kube-proxy leaves conntrack flows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.process import (
    ChildProcess,
    ClusterError,
    ProcessFrontend,
    python_module,
)

__all__ = ["UserspaceService"]

_CONNECT_TIMEOUT_S = 2.0


class _Proxy:
    def __init__(self) -> None:
        self.endpoints: list[tuple[str, int]] = []

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Like the userspace proxier: try the endpoints in a random order until one accepts.
        candidates = random.sample(self.endpoints, len(self.endpoints))
        for host, port in candidates:
            try:
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(host, port), _CONNECT_TIMEOUT_S
                )
            except (OSError, asyncio.TimeoutError):
                continue
            up_reader, up_writer = upstream
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            return
        writer.close()

    def control(self, line: str) -> str:
        command, *args = line.split()
        if command != "ENDPOINTS":
            return f"ERROR unknown command {command!r}"
        endpoints = []
        for arg in args:
            host, _, port = arg.rpartition(":")
            endpoints.append((host, int(port)))
        self.endpoints = endpoints
        return f"OK {len(endpoints)}"


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while chunk := await source.read(65536):
            sink.write(chunk)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        # One side ended: end the whole flow, as a reset pod connection does.
        sink.close()
        with contextlib.suppress(OSError):
            await sink.wait_closed()


async def _serve(listen: str) -> None:
    host, _, port = listen.rpartition(":")
    proxy = _Proxy()
    server = await asyncio.start_server(proxy.accept, host, int(port), backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    control = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
    print(f"READY {bound}", flush=True)
    while line := await control.readline():
        if line.strip():
            print(proxy.control(line.decode()), flush=True)
    server.close()  # stdin closed: the harness is gone


class UserspaceService(ProcessFrontend):
    """The default L4 Service: needs nothing installed and no root.

    Args:
        log_dir: where the proxy's log goes.
        avoid_port: the pods' target port, which the Service port must differ from.
        host: the "ClusterIP" to listen on.
    """

    def __init__(self, log_dir: Path, *, avoid_port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._avoid = avoid_port
        self._process = self._child = ChildProcess(
            python_module(__name__, "--listen", f"{host}:0"),
            name="service-userspace",
            log_dir=log_dir,
            control=True,
        )

    def __repr__(self) -> str:
        return f"<UserspaceService {self.address} {self._process!r}>"

    def start(self, endpoints: Sequence[Endpoint]) -> None:
        for _ in range(5):
            self._child.start()
            self._port = self._child.wait_ready()
            if self._port != self._avoid:
                break
            self._child.stop()
        else:
            raise ClusterError(f"no Service port different from the target port {self._avoid}")
        self.update(endpoints)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._child.request(" ".join(["ENDPOINTS", *(e.address for e in endpoints)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port; port 0 picks one")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen))


if __name__ == "__main__":
    main()
