"""Just enough of the DNS wire format (RFC 1035) for a cluster DNS: A records, one question.

Pure functions (and one lookup, UDP then TCP when truncated): the probe reads headless answers
with them, and the local cluster's embedded DNS server answers with them. A lookup takes only the
response to its own query (a random id, the same question, QR set, a standard query), as a stub
resolver must: anything else on the socket is ignored, not read as the answer.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "UDP_PLAIN_SIZE",
    "Question",
    "answer",
    "answers_query",
    "is_truncated",
    "lookup_a",
    "parse_answer",
    "parse_question",
    "query",
]

TYPE_A = 1
CLASS_IN = 1
NOERROR, FORMERR, NXDOMAIN, NOTIMP = 0, 1, 3, 4
_HEADER = struct.Struct("!HHHHHH")
_QR, _OPCODE, _TC, _RCODE = 0x8000, 0x7800, 0x0200, 0x000F
#: One A record with a compressed name: pointer, type, class, TTL, length, 4 bytes of address.
_A_RECORD_SIZE = 16
#: What a server may send over UDP to a query without EDNS (RFC 1035 4.2.1).
UDP_PLAIN_SIZE = 512
#: The largest UDP reply read; a server that has more to say sets TC and the lookup asks on TCP.
_UDP_MAX = 4096


@dataclass(frozen=True)
class Question:
    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    end: int  # offset just past the question section


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        length = message[offset]
        if length & 0xC0:
            raise ValueError("compressed names do not occur in questions")
        offset += 1
        if length == 0:
            return ".".join(labels).lower(), offset
        labels.append(message[offset : offset + length].decode("ascii"))
        offset += length


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def parse_question(message: bytes) -> Question:
    """The first question of a query; ValueError if it is not one."""
    if len(message) < _HEADER.size:
        raise ValueError("shorter than a DNS header")
    ident, flags, qdcount, _, _, _ = _HEADER.unpack_from(message)
    if qdcount < 1:
        raise ValueError("no question")
    name, offset = _read_name(message, _HEADER.size)
    qtype, qclass = struct.unpack_from("!HH", message, offset)
    return Question(ident, flags, name, qtype, qclass, offset + 4)


def answer(
    message: bytes,
    records: Mapping[str, Sequence[str]],
    ttl_s: int,
    max_size: int | None = None,
) -> bytes:
    """The authoritative answer to ``message`` from ``records`` (name -> IPv4 addresses).

    A known name gets its A records, and NOERROR with no data for any other type (AAAA):
    that is what lets a resolver that asks both settle on the A answer. Unknown: NXDOMAIN.
    With ``max_size`` (512 over UDP without EDNS, RFC 1035 4.2.1), the records that do not fit
    are left out and TC is set, as a real server does: the client must ask again over TCP.
    """
    try:
        question = parse_question(message)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error):
        ident = int.from_bytes(message[:2], "big") if len(message) >= 2 else 0
        return _HEADER.pack(ident, 0x8000 | FORMERR, 0, 0, 0, 0)
    opcode = question.flags & 0x7800
    flags = 0x8000 | opcode | 0x0400 | (question.flags & 0x0100) | 0x0080
    body = message[_HEADER.size : question.end]
    if opcode:
        return _HEADER.pack(question.id, flags | NOTIMP, 1, 0, 0, 0) + body
    addresses = records.get(question.name.rstrip("."))
    if addresses is None:
        return _HEADER.pack(question.id, flags | NXDOMAIN, 1, 0, 0, 0) + body
    answers = []
    if question.qtype == TYPE_A and question.qclass == CLASS_IN:
        for address in addresses:
            rdata = ipaddress.IPv4Address(address).packed
            answers.append(struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl_s, 4) + rdata)
    if max_size is not None:
        fits = max(0, (max_size - _HEADER.size - len(body)) // _A_RECORD_SIZE)
        if fits < len(answers):
            answers, flags = answers[:fits], flags | _TC
    return (
        _HEADER.pack(question.id, flags | NOERROR, 1, len(answers), 0, 0) + body + b"".join(answers)
    )


def query(ident: int, name: str, qtype: int = TYPE_A) -> bytes:
    """A recursive-desired query for ``name``."""
    return (
        _HEADER.pack(ident, 0x0100, 1, 0, 0, 0)
        + _encode_name(name)
        + struct.pack("!HH", qtype, CLASS_IN)
    )


def parse_answer(message: bytes) -> tuple[int, list[str]]:
    """The rcode and the A addresses of a response (answers with compressed names only)."""
    question = parse_question(message)
    _, _, _, ancount, _, _ = _HEADER.unpack_from(message)
    offset, addresses = question.end, []
    for _ in range(ancount):
        if message[offset] & 0xC0:
            offset += 2
        else:
            _, offset = _read_name(message, offset)
        rtype, _, _, length = struct.unpack_from("!HHIH", message, offset)
        offset += 10
        if rtype == TYPE_A and length == 4:
            addresses.append(str(ipaddress.IPv4Address(message[offset : offset + 4])))
        offset += length
    return question.flags & 0x000F, addresses


def answers_query(message: bytes, ident: int, name: str, qtype: int = TYPE_A) -> bool:
    """Whether ``message`` is the response to our query ``ident`` for ``name``: same id, QR set,
    a standard query, and the same question. ValueError (and the like) if it cannot be read."""
    question = parse_question(message)
    return (
        question.id == ident
        and question.flags & _QR != 0
        and question.flags & _OPCODE == 0
        and question.name == name.lower().rstrip(".")
        and question.qtype == qtype
        and question.qclass == CLASS_IN
    )


def is_truncated(message: bytes) -> bool:
    """The TC bit: the server had more records than fit in this (UDP) message."""
    return len(message) >= _HEADER.size and bool(_HEADER.unpack_from(message)[1] & _TC)


def _ask_udp(
    address: tuple[str, int], message: bytes, ident: int, name: str, deadline: float
) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(address)  # the kernel then drops datagrams from any other address
        sock.send(message)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(_UDP_MAX)
            except TimeoutError:
                return None
            try:
                if answers_query(data, ident, name):
                    return data
            except (ValueError, IndexError, UnicodeDecodeError, struct.error):
                pass  # not a DNS response at all: keep waiting for ours
    return None


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the DNS server closed the connection mid-message")
        data += chunk
    return data


def _ask_tcp(
    address: tuple[str, int], message: bytes, ident: int, name: str, deadline: float
) -> bytes | None:
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    with socket.create_connection(address, timeout=left) as sock:
        sock.sendall(struct.pack("!H", len(message)) + message)
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        (length,) = struct.unpack("!H", _read_exactly(sock, 2))
        data = _read_exactly(sock, length)
    return data if answers_query(data, ident, name) else None


def lookup_a(server: str, name: str, timeout: float = 1.0) -> list[str] | None:
    """Ask ``server`` (``host:port``) for the A records of ``name``: UDP, then TCP if truncated.

    Returns:
        the sorted A addresses (``[]`` for NXDOMAIN or no records); None when no valid answer
        came within ``timeout`` (no reply, only replies to other queries, an error rcode, or a
        truncated reply and no TCP answer), so a DNS failure never reads as "no pods".
    """
    host, _, port = server.rpartition(":")
    address = (host, int(port))
    deadline = time.monotonic() + timeout
    ident = secrets.randbelow(0x10000)  # unpredictable, so a forged reply has to guess it
    message = query(ident, name)
    try:
        data = _ask_udp(address, message, ident, name, deadline)
        if data is not None and is_truncated(data):
            data = _ask_tcp(address, message, ident, name, deadline)
    except OSError:
        return None
    if data is None:
        return None
    rcode, addresses = parse_answer(data)
    if rcode not in (NOERROR, NXDOMAIN):
        return None
    return sorted(addresses, key=ipaddress.IPv4Address)
