"""The ``embedded`` cluster DNS: a tiny authoritative server for a headless Service's A records.

It runs as its own process (``python -m grpc_balance_mw.testing.dns_server``) on UDP and TCP of
one port, prints ``READY <port>``, and reads control lines on stdin:
``RECORDS name ip ...`` replaces the A records of ``name`` and is answered ``OK <n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from grpc_balance_mw.dns_message import UDP_PLAIN_SIZE, answer
from grpc_balance_mw.testing.endpoints import Endpoint
from grpc_balance_mw.testing.process import ChildProcess, ProcessFrontend, python_module

__all__ = ["EmbeddedDNS"]


class _Zone(asyncio.DatagramProtocol):
    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self.records: dict[str, list[str]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        # Truncated to 512 bytes like a real server's UDP answer: many pods need TCP.
        self.transport.sendto(answer(data, self.records, self.ttl_s, UDP_PLAIN_SIZE), addr)

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = answer(await reader.readexactly(length), self.records, self.ttl_s)
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        writer.close()

    def control(self, line: str) -> str:
        command, *args = line.split()
        if command != "RECORDS" or not args:
            return f"ERROR expected 'RECORDS name ip ...', got {line.strip()!r}"
        name, *addresses = args
        self.records[name.lower().rstrip(".")] = addresses
        return f"OK {len(addresses)}"


async def _serve(host: str, ttl_s: int) -> None:
    loop = asyncio.get_running_loop()
    zone = _Zone(ttl_s)
    for _ in range(20):  # the UDP port picked by port 0 may be taken on TCP: draw again
        udp, _ = await loop.create_datagram_endpoint(lambda: zone, local_addr=(host, 0))
        port = udp.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(zone.serve_tcp, host, port)
        except OSError:
            udp.close()
            continue
        break
    else:
        raise SystemExit(f"no port free for both UDP and TCP on {host}")
    control = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
    print(f"READY {port}", flush=True)
    while line := await control.readline():
        if line.strip():
            print(zone.control(line.decode()), flush=True)
    tcp.close()
    udp.close()


class EmbeddedDNS(ProcessFrontend):
    """The default cluster DNS: one A record per ready pod under ``name``, a short TTL.

    Args:
        log_dir: where its log goes.
        name: the headless Service's FQDN (``charge-points.ev.svc.cluster.local``).
        ttl_s: the TTL of its answers.
        host: the address it listens on.
    """

    def __init__(
        self, log_dir: Path, *, name: str, ttl_s: int = 1, host: str = "127.0.0.1"
    ) -> None:
        super().__init__(host)
        self.name = name
        self._process = self._child = ChildProcess(
            python_module(__name__, "--listen", host, "--ttl", str(ttl_s)),
            name="dns-embedded",
            log_dir=log_dir,
            control=True,
        )

    def __repr__(self) -> str:
        return f"<EmbeddedDNS {self.name} at {self.address}>"

    def start(self, endpoints: Sequence[Endpoint]) -> None:
        self._child.start()
        self._port = self._child.wait_ready()
        self.update(endpoints)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._child.request(" ".join(["RECORDS", self.name, *(e.ip for e in endpoints)]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1", help="the address (port: picked)")
    parser.add_argument("--ttl", type=int, default=1, help="TTL of answers, seconds")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.listen, args.ttl))


if __name__ == "__main__":
    main()
