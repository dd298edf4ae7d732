"""Calls that end before any response header: observed, they end as on a bare channel.

grpcio runs done-callbacks on the channel's own thread; one that waits for the response headers
of a call that will never have any (a server without the method, a killed pod, a trailers-only
abort) blocks that thread, so the call hangs past its deadline and every later call on the
channel with it. Each case runs against a bare channel too, in a thread (or task) bounded in
time, so a hang fails the test instead of blocking the run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from affinity_fixtures import NO_WARMUP, SYNC_WRAPPERS, observe_sync
from hostile_pods import CALL_KINDS, POD, method_path, serve

from grpc_balance_mw.affinity import AffinityRegistry
from grpc_balance_mw.aio import interceptors as aio_client
from grpc_balance_mw.observing import ObserveOptions

pytestmark = pytest.mark.timeout(30)

#: Each call's deadline; a hang is declared well after it.
DEADLINE_S = 2.0
HANG_S = DEADLINE_S + 8.0
EXPECTED = {
    "no_method": grpc.StatusCode.UNIMPLEMENTED,
    "abort": grpc.StatusCode.FAILED_PRECONDITION,
    "killed": grpc.StatusCode.UNAVAILABLE,
}
#: (call kind, how it is made): unary responses both plainly and as a future.
SYNC_CALLS = [
    ("unary_unary", "call"),
    ("unary_unary", "future"),
    ("stream_unary", "call"),
    ("stream_unary", "future"),
    ("unary_stream", "iterate"),
    ("stream_stream", "iterate"),
]


class Pod:
    """A server that ends calls early the ``scenario`` way; ``killed`` is a process SIGKILLed
    by :meth:`strike` after the channels connected."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.server: grpc.Server | None = None
        self.process: subprocess.Popen[str] | None = None
        if scenario == "killed":
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("hostile_pods.py"))],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.process.stdout is not None
            self.target = f"127.0.0.1:{self.process.stdout.readline().strip()}"
        else:
            self.server, self.target = serve("abort" if scenario == "abort" else None)

    def strike(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            assert self.process.stdout is not None
            self.process.stdout.close()

    def stop(self) -> None:
        self.strike()
        if self.server is not None:
            self.server.stop(None).wait()


@pytest.fixture(params=sorted(EXPECTED))
def pod(request: pytest.FixtureRequest) -> Iterator[Pod]:
    pod = Pod(request.param)
    yield pod
    pod.stop()


def _request(kind: str) -> Any:
    return iter([b"a", b"b"]) if kind.startswith("stream") else b"a"


def call_sync(channel: grpc.Channel, kind: str, how: str) -> grpc.StatusCode:
    method = getattr(channel, kind)(method_path(kind))
    try:
        if how == "iterate":
            list(method(_request(kind), timeout=DEADLINE_S))
        elif how == "future":
            method.future(_request(kind), timeout=DEADLINE_S).result()
        else:
            method(_request(kind), timeout=DEADLINE_S)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def bounded(run: Callable[[], Any]) -> Any:
    """``run()`` in a daemon thread; fails the test if it is still blocked after ``HANG_S``."""
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.append(run()), daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        pytest.fail(
            f"the call was still blocked {HANG_S} s after it began ({DEADLINE_S} s deadline)"
        )
    return outcome[0]


def settled(detector: Any, calls: int) -> Any:
    """The snapshot once ``calls`` calls are counted (a done-callback may count just after)."""
    for _ in range(200):
        snapshot = detector.snapshot()
        if snapshot.calls >= calls:
            return snapshot
        time.sleep(0.01)
    return detector.snapshot()


def _check_counted(snapshot: Any, scenario: str) -> None:
    assert snapshot.calls == 2
    # A trailers-only abort names the pod in its trailers: it is still read.
    assert set(snapshot.pods) == ({POD.name} if scenario == "abort" else set())


@pytest.mark.parametrize(("kind", "how"), SYNC_CALLS, ids=[f"{k}-{h}" for k, h in SYNC_CALLS])
@pytest.mark.parametrize("wrapper", SYNC_WRAPPERS)
def test_sync_calls_end_as_on_a_bare_channel(pod: Pod, wrapper: str, kind: str, how: str) -> None:
    with grpc.insecure_channel(pod.target) as bare, grpc.insecure_channel(pod.target) as inner:
        observed, watcher = observe_sync(
            inner, pod.target, wrapper, registry=AffinityRegistry(NO_WARMUP)
        )
        if pod.scenario == "killed":  # both channels connected to the pod before it dies
            for channel in (bare, inner):
                assert bounded(lambda c=channel: call_sync(c, kind, how)) is grpc.StatusCode.OK
            pod.strike()
        expected = bounded(lambda: call_sync(bare, kind, how))
        assert expected is EXPECTED[pod.scenario]
        assert bounded(lambda: call_sync(observed, kind, how)) is expected
        # The channel is not wedged: the next call ends the same way.
        assert bounded(lambda: call_sync(observed, kind, how)) is expected
    _check_counted(settled(watcher.detector, 2), pod.scenario)


async def call_aio(channel: grpc.aio.Channel, kind: str) -> grpc.StatusCode:
    method = getattr(channel, kind)(method_path(kind))
    try:
        call = method(_request(kind), timeout=DEADLINE_S)
        if kind.endswith("stream"):
            [_ async for _ in call]
        else:
            await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_aio_calls_end_as_on_a_bare_channel(pod: Pod, kind: str) -> None:
    interceptor = aio_client.AffinityInterceptors(
        pod.target, ObserveOptions(registry=AffinityRegistry(NO_WARMUP))
    )
    async with (
        grpc.aio.insecure_channel(pod.target) as bare,
        grpc.aio.insecure_channel(pod.target, interceptors=interceptor.interceptors) as observed,
    ):
        if pod.scenario == "killed":
            for channel in (bare, observed):
                assert await asyncio.wait_for(call_aio(channel, kind), HANG_S) is grpc.StatusCode.OK
            await asyncio.to_thread(pod.strike)
        # grpc.aio itself ends a request stream that the server refuses at once with INTERNAL
        # ("Internal error from Core") about 4 times in 10, bare or not: its request writer races
        # the status. It does so, seldom, on a connection the killed pod left too (once in a CI
        # run, on the bare channel: the writer raced the broken connection's UNAVAILABLE).
        accepted = {EXPECTED[pod.scenario]}
        if kind.startswith("stream"):
            accepted.add(grpc.StatusCode.INTERNAL)
        assert await asyncio.wait_for(call_aio(bare, kind), HANG_S) in accepted
        for _ in range(2):
            assert await asyncio.wait_for(call_aio(observed, kind), HANG_S) in accepted
        await asyncio.wait_for(interceptor.settle(), HANG_S)
    snapshot = interceptor.detector.snapshot()
    if pod.scenario == "killed":  # the echo call before the kill counts too
        assert snapshot.calls == 3
    elif kind.startswith("stream"):
        # The same race, seen by the interceptor: grpc.aio hands it an inner call that can end
        # INTERNAL without the server's trailers while the caller's call gets the server's
        # status (139 of 300 such calls here): that call's pod is then unknown.
        assert snapshot.calls == 2 and set(snapshot.pods) <= {POD.name}
    else:
        _check_counted(snapshot, pod.scenario)
