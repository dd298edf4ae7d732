"""Predial against real sockets: several dials under way at once (sync), and a connection that
cannot connect is never handed to a call and is dialled again later (sync and aio)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from redial_fixtures import Driver, PeerPod, wait_until


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP listener that never accepts: the kernel completes each TCP handshake, so a gRPC
    client's connection waits in CONNECTING for the server's HTTP/2 SETTINGS, which never
    come."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_several_dials_are_under_way_at_once(silent_server: str) -> None:
    # The sync predialler only: the aio one dials one at a time
    # (see grpc_balance_mw.aio.dial_per_request).
    driver = Driver("sync")
    channel = driver.channel(silent_server, predial=3, dial_timeout_s=60)
    # one dial at a time would hold the other two until the first one's 60 s timeout
    assert wait_until(lambda: driver.stats(channel)[0] == 3, driver)
    assert driver.ready(channel) == 0  # none is READY: none is counted as such
    driver.close(channel)  # does not wait for the handshakes
    assert wait_until(lambda: driver.stats(channel)[2] == 3, driver)


@pytest.mark.slow
def test_a_dial_that_fails_is_not_handed_out_and_is_dialled_again(driver: Driver) -> None:
    with socket.socket() as probe:  # a port nothing listens on, until the pod below takes it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = driver.channel(f"127.0.0.1:{port}", predial=2, dial_timeout_s=0.3)
    assert wait_until(lambda: driver.predial_failures(channel) >= 2, driver)
    assert driver.ready(channel) == 0
    assert driver.call(channel, timeout=2).code is grpc.StatusCode.UNAVAILABLE
    assert driver.stats(channel)[1] == 0  # the call dialled its own; no failed one was used
    pod = PeerPod(port=port)
    try:
        assert wait_until(lambda: driver.ready(channel) == 2, driver)
        assert driver.call(channel).code is grpc.StatusCode.OK
        assert driver.stats(channel)[1] == 1
        driver.close(channel)
    finally:
        pod.stop()
    assert wait_until(lambda: driver.stats(channel)[2] == driver.stats(channel)[0], driver)
