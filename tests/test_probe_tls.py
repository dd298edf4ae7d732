"""The pod probe of an observed TLS channel dials with TLS, never in plaintext, sync and aio.

A real TLS server on loopback behind a counting TCP relay that reads the first byte of every
connection: 0x16 opens a TLS handshake, ``P`` (``PRI * HTTP/2.0``) a plaintext HTTP/2 one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import require
from redial_fixtures import Certificates, PeerPod, make_certificates

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio.observed_channel import observe as aio_observe
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.probe import PodProbe

#: Each test starts pods or servers of its own and takes seconds: the slow tier.
pytestmark = pytest.mark.slow

TLS_RECORD = 0x16


class CountingRelay:
    """Forwards each TCP connection to ``backend``; counts them by their first byte."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend = backend
        self.first_bytes: list[int] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def plaintext(self) -> int:
        return sum(1 for byte in self.first_bytes if byte != TLS_RECORD)

    @property
    def tls(self) -> int:
        return sum(1 for byte in self.first_bytes if byte == TLS_RECORD)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self.backend)
            self.sockets += [client, upstream]
            for source, sink, first in ((client, upstream, True), (upstream, client, False)):
                pump = threading.Thread(target=self._pump, args=(source, sink, first), daemon=True)
                self.threads.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, first: bool) -> None:
        try:
            while data := source.recv(65536):
                if first:
                    self.first_bytes.append(data[0])
                    first = False
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stopping.set()
        self.threads[0].join(5)  # the accept loop, before its socket goes
        self.listener.close()
        for sock in self.sockets:
            sock.close()
        for thread in self.threads[1:]:
            thread.join(5)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    require(shutil.which("openssl") is not None, "openssl is not installed")
    return make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def relay(certificates: Certificates) -> Iterator[CountingRelay]:
    pod = PeerPod(grpc.ssl_server_credentials([(certificates.key, certificates.chain)]))
    running = CountingRelay(("127.0.0.1", pod.port))
    yield running
    running.close()
    pod.stop()


def _probe_of(channel: Any) -> PodProbe:
    probe = channel.observer.probe
    assert isinstance(probe, PodProbe)
    return probe


def _first_round(mode: str, target: str, credentials: Any, options: ObserveOptions) -> PodProbe:
    """One call through ``observe(secure channel, options)``, then its probe once the round
    that call started has ended."""

    def ended(channel: Any) -> PodProbe:
        probe = _probe_of(channel)
        deadline = time.monotonic() + 10
        while probe.rounds < 1 and time.monotonic() < deadline:
            probe.join(0.1)
        return probe

    if mode == "sync":
        with observe(grpc.secure_channel(target, credentials), options) as channel:
            assert call_sync(channel, "unary_unary").code is grpc.StatusCode.OK
            return ended(channel)

    async def main() -> PodProbe:
        channel = aio_observe(grpc.aio.secure_channel(target, credentials), options, target=target)
        try:
            assert (await call_aio(channel, "unary_unary")).code is grpc.StatusCode.OK
            return await asyncio.to_thread(ended, channel)
        finally:
            await channel.close()

    return asyncio.run(main())


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_the_probe_of_a_tls_channel_dials_with_its_credentials(
    relay: CountingRelay, certificates: Certificates, mode: str
) -> None:
    target = f"127.0.0.1:{relay.port}"
    credentials = grpc.ssl_channel_credentials(certificates.ca)
    options = ObserveOptions(probe=True, probe_credentials=credentials, registry=AffinityRegistry())
    probe = _first_round(mode, target, credentials, options)
    assert probe.rounds >= 1 and probe.failures == 0, probe
    assert relay.plaintext == 0, relay.first_bytes
    assert relay.tls >= 2, relay.first_bytes  # the channel's connection and the probe's


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_probe_true_without_credentials_is_refused_naming_how_to_pass_them(
    relay: CountingRelay, certificates: Certificates, mode: str
) -> None:
    target = f"127.0.0.1:{relay.port}"
    credentials = grpc.ssl_channel_credentials(certificates.ca)

    def observed() -> Any:
        options = ObserveOptions(probe=True, registry=AffinityRegistry())
        if mode == "sync":
            return observe(grpc.secure_channel(target, credentials), options)

        async def main() -> Any:
            return aio_observe(grpc.aio.secure_channel(target, credentials), options, target=target)

        return asyncio.run(main())

    with pytest.raises(ConfigurationError, match=r"probe_credentials=.*'insecure'"):
        observed()
    assert relay.first_bytes == []  # nothing was dialled, in plaintext or otherwise


def test_probe_credentials_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="probe_credentials"):
        ObserveOptions(probe=True, probe_credentials=b"ca.pem")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["sync", "aio"])
def test_the_default_probe_never_sends_a_tls_target_plaintext(
    relay: CountingRelay, certificates: Certificates, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """observe() with no options probes by itself, and is not told the credentials: it looks
    whether the target speaks plaintext HTTP/2 unasked, which a TLS server never does, and then
    stops, saying how to give it the credentials."""
    target = f"127.0.0.1:{relay.port}"
    credentials = grpc.ssl_channel_credentials(certificates.ca)
    options = ObserveOptions(registry=AffinityRegistry())
    caplog.set_level(logging.INFO, logger="grpc_balance_mw.probe")
    probe = _first_round(mode, target, credentials, options)
    assert probe.rounds == 1 and probe.stopped, probe
    assert relay.plaintext == 0, relay.first_bytes
    assert any("probe_credentials" in r.getMessage() for r in caplog.records)
