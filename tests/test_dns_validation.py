"""Headless DNS lookups against a hostile DNS server on loopback: replies to other queries, replies
that are not responses, and truncated replies (TC=1) must never be read as the pods that exist."""

from __future__ import annotations

import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from grpc_balance_mw.dns_message import (
    NOERROR,
    UDP_PLAIN_SIZE,
    answer,
    is_truncated,
    lookup_a,
    parse_answer,
    parse_question,
    query,
)
from grpc_balance_mw.headless import DnsTarget, resolve_addresses
from grpc_balance_mw.testing.dns_server import EmbeddedDNS
from grpc_balance_mw.testing.endpoints import Endpoint

NAME = "charge-points.ev.svc.cluster.local"
PODS = [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(60)]
FORGED = "192.0.2.66"
RECORD = 16  # one A answer with a compressed name: 2 + 2 + 2 + 4 + 2 + 4 bytes

Reply = Callable[[bytes], list[bytes]]


def _full(query: bytes, pods: list[str] = PODS) -> bytes:
    return answer(query, {NAME: pods}, ttl_s=5)


def _with(message: bytes, *, ident: int | None = None, set_flags: int = 0, clear: int = 0) -> bytes:
    old_id, flags = struct.unpack_from("!HH", message)
    header = struct.pack("!HH", old_id if ident is None else ident, (flags | set_flags) & ~clear)
    return header + message[4:]


def _truncated(query: bytes, kept: int) -> bytes:
    """The first ``kept`` of the 60 records, TC set: what a server does when UDP is too small."""
    full = _full(query)
    end = parse_question(full).end
    header = bytearray(_with(full[:end], set_flags=0x0200))
    struct.pack_into("!H", header, 6, kept)
    return bytes(header) + full[end : end + kept * RECORD]


class HostileDNS:
    """UDP answers from a script (``udp(query) -> datagrams``); TCP answers honestly, if on."""

    def __init__(self, udp: Reply, tcp: bool = True) -> None:
        self.udp_reply = udp
        self.ids: list[int] = []
        self.tcp_queries = 0
        self.tcp: socket.socket | None = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))  # a fresh TCP port is seldom taken on UDP
        if tcp:
            self.tcp.listen(4)
        else:
            self.tcp.close()  # the port stays ours on UDP; nothing answers on TCP
            self.tcp = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def target(self) -> DnsTarget:
        return DnsTarget(f"127.0.0.1:{self.port}", NAME, 50051)

    def _serve(self) -> None:
        sockets = [s for s in (self.udp, self.tcp) if s is not None]
        while not self.stopping.is_set():
            readable, _, _ = select.select(sockets, [], [], 0.05)
            for sock in readable:
                if sock is self.udp:
                    query, peer = self.udp.recvfrom(512)
                    self.ids.append(parse_question(query).id)
                    for datagram in self.udp_reply(query):
                        self.udp.sendto(datagram, peer)
                else:
                    self._answer_tcp(sock)

    def _answer_tcp(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            (length,) = struct.unpack("!H", conn.recv(2))
            query = conn.recv(length)
            self.tcp_queries += 1
            reply = _full(query)
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.udp.close()
        if self.tcp is not None:
            self.tcp.close()


@pytest.fixture
def dns() -> Iterator[Callable[..., HostileDNS]]:
    servers: list[HostileDNS] = []

    def start(udp: Reply, tcp: bool = True) -> HostileDNS:
        servers.append(HostileDNS(udp, tcp))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _other_id(query: bytes) -> int:
    return parse_question(query).id ^ 0x5A5A


def test_an_answer_to_another_query_id_is_not_taken(dns: Callable[..., HostileDNS]) -> None:
    server = dns(lambda q: [_with(_full(q, [FORGED]), ident=_other_id(q))])
    assert resolve_addresses(server.target, timeout_s=0.5) is None


def test_the_answer_to_our_query_is_taken_after_a_forged_one(
    dns: Callable[..., HostileDNS],
) -> None:
    server = dns(lambda q: [_with(_full(q, [FORGED]), ident=_other_id(q)), _full(q)])
    assert resolve_addresses(server.target, timeout_s=2) == sorted(PODS, key=_ip)


def test_a_message_that_is_not_a_response_is_not_taken(dns: Callable[..., HostileDNS]) -> None:
    server = dns(lambda q: [_with(_full(q, [FORGED]), clear=0x8000)])  # QR = 0: a query
    assert resolve_addresses(server.target, timeout_s=0.5) is None


def test_an_answer_to_another_question_is_not_taken(dns: Callable[..., HostileDNS]) -> None:
    def other_name(query: bytes) -> list[bytes]:
        other = answer(query.replace(b"charge-points", b"evil-points!!"), {}, ttl_s=5)
        return [other]  # same id, NXDOMAIN for a name we did not ask

    server = dns(other_name)
    assert resolve_addresses(server.target, timeout_s=0.5) is None


@pytest.mark.parametrize("kept", [29, 0])
def test_a_truncated_answer_is_asked_again_over_tcp(
    dns: Callable[..., HostileDNS], kept: int
) -> None:
    server = dns(lambda q: [_truncated(q, kept)])
    assert resolve_addresses(server.target, timeout_s=2) == sorted(PODS, key=_ip)
    assert server.tcp_queries == 1


def test_a_truncated_answer_without_tcp_is_no_answer(dns: Callable[..., HostileDNS]) -> None:
    server = dns(lambda q: [_truncated(q, 29)], tcp=False)
    assert resolve_addresses(server.target, timeout_s=1) is None  # not "29 pods"


def test_every_query_has_its_own_unpredictable_id(dns: Callable[..., HostileDNS]) -> None:
    server = dns(lambda q: [_full(q)])
    for _ in range(4):
        assert resolve_addresses(server.target, timeout_s=2) == sorted(PODS, key=_ip)
    assert len(set(server.ids)) > 1, server.ids  # a fixed id: 4 equal ones


def _ip(address: str) -> tuple[int, ...]:
    return tuple(int(part) for part in address.split("."))


def test_the_embedded_cluster_dns_truncates_udp_like_a_real_server(tmp_path: Path) -> None:
    udp_answer = answer(query(1, NAME), {NAME: PODS}, ttl_s=5, max_size=UDP_PLAIN_SIZE)
    rcode, addresses = parse_answer(udp_answer)
    assert is_truncated(udp_answer) and len(udp_answer) <= 512
    assert rcode == NOERROR and 0 < len(addresses) < len(PODS)
    server = EmbeddedDNS(tmp_path, name=NAME)
    server.start([Endpoint(f"pod-{i}", ip, 50051) for i, ip in enumerate(PODS)])
    try:  # 60 pods do not fit in 512 bytes: the lookup gets them all over TCP
        assert lookup_a(server.address, NAME, timeout=2) == sorted(PODS, key=_ip)
    finally:
        server.stop()
