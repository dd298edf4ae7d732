"""The forwarder behind :class:`grpc_balance_mw.testing.netns.Bridge`.

``ip netns exec NS python -m grpc_balance_mw.testing.ns_bridge --listen-fd N --connect IP:PORT``

It inherits a listening socket bound in the host namespace, runs inside NS, and for every host
connection it accepts opens exactly one connection to ``IP:PORT`` inside NS and copies bytes both
ways. It prints ``READY`` once accepting, and exits on SIGTERM or when its stdin closes (the
parent is gone), so it cannot outlive the test that started it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys

_CONNECT_TIMEOUT_S = 5.0
_CHUNK = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A peer that vanishes mid-stream ends this direction; the other one ends on its own.
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, as a refused connection looks to a client of a real Service."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _forward(
    host_reader: asyncio.StreamReader, host_writer: asyncio.StreamWriter, host: str, port: int
) -> None:
    try:
        inner_reader, inner_writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), _CONNECT_TIMEOUT_S
        )
    except (OSError, asyncio.TimeoutError):
        _reset(host_writer)
        return
    try:
        await asyncio.gather(_pump(host_reader, inner_writer), _pump(inner_reader, host_writer))
    finally:
        for writer in (inner_writer, host_writer):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def serve(listen_fd: int, host: str, port: int) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)

    def parent_gone() -> None:
        # Our stdin is a pipe from the parent: readable with no data means it closed or died.
        try:
            data = os.read(sys.stdin.fileno(), 1024)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            stopping.set()

    loop.add_reader(sys.stdin.fileno(), parent_gone)
    listener = socket.socket(fileno=listen_fd)
    forwarding: set[asyncio.Task[None]] = set()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        forwarding.add(task)
        try:
            await _forward(reader, writer, host, port)
        except asyncio.CancelledError:
            # The forwarder is stopping: a normal end. Left cancelled, the task is logged as
            # an error with a traceback by Python 3.11's start_server, one per connection.
            pass
        finally:
            forwarding.discard(task)

    server = await asyncio.start_server(forward, sock=listener, limit=_CHUNK)
    print("READY", flush=True)
    async with server:
        await stopping.wait()
        # End open connections here, while the loop runs, rather than leave them to be
        # destroyed pending when it closes.
        for task in list(forwarding):
            task.cancel()
        await asyncio.gather(*forwarding, return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--connect", required=True, help="IP:PORT inside the namespace")
    args = parser.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    asyncio.run(serve(args.listen_fd, host, int(port)))


if __name__ == "__main__":
    main()
