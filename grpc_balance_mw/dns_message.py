"""Just enough of the DNS wire format (RFC 1035) for a cluster DNS: A records, one question.

Pure functions (and one UDP lookup): the probe reads headless answers with them, and the local
cluster's embedded DNS server answers with them.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Question", "answer", "lookup_a", "parse_answer", "parse_question", "query"]

TYPE_A = 1
CLASS_IN = 1
NOERROR, FORMERR, NXDOMAIN, NOTIMP = 0, 1, 3, 4
_HEADER = struct.Struct("!HHHHHH")


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


def answer(message: bytes, records: Mapping[str, Sequence[str]], ttl_s: int) -> bytes:
    """The authoritative answer to ``message`` from ``records`` (name -> IPv4 addresses).

    A known name gets its A records, and NOERROR with no data for any other type (AAAA):
    that is what lets a resolver that asks both settle on the A answer. Unknown: NXDOMAIN.
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
    answers = b""
    if question.qtype == TYPE_A and question.qclass == CLASS_IN:
        for address in addresses:
            rdata = ipaddress.IPv4Address(address).packed
            answers += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, ttl_s, 4) + rdata
    count = len(answers) // 16
    return _HEADER.pack(question.id, flags | NOERROR, 1, count, 0, 0) + body + answers


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


def lookup_a(server: str, name: str, timeout: float = 1.0) -> list[str] | None:
    """Ask ``server`` (``host:port``) over UDP; the sorted A addresses, None on no answer."""
    host, _, port = server.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query(0x4B8, name), (host, int(port)))
            data, _ = sock.recvfrom(4096)
        except OSError:
            return None
    rcode, addresses = parse_answer(data)
    if rcode not in (NOERROR, NXDOMAIN):
        return None
    return sorted(addresses, key=ipaddress.IPv4Address)
