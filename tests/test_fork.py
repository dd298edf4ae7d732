"""A fork taken while another thread holds a lock: the child gets fresh locks and threads."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
from fault_load import wait_for

from grpc_balance_mw.affinity import (
    AffinityConfig,
    AffinityRegistry,
    AffinityState,
)
from grpc_balance_mw.affinity.observer import CallObserver
from grpc_balance_mw.affinity.state import Transition
from grpc_balance_mw.probe import PodProbe
from grpc_balance_mw.telemetry import AffinityTelemetry

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
]
#: How long the child may take; it needs milliseconds, a deadlocked one never ends.
CHILD_S = 10.0


@pytest.fixture
def held() -> Iterator[Callable[[threading.Lock | threading.Condition], None]]:
    """Hold locks on another thread until the test ends (as a busy thread would at a fork)."""
    release = threading.Event()
    threads = []

    def hold(lock: threading.Lock | threading.Condition) -> None:
        taken = threading.Event()

        def run() -> None:
            with lock:
                taken.set()
                release.wait(30)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        assert taken.wait(10)
        threads.append(thread)

    yield hold
    release.set()
    for thread in threads:
        thread.join(10)


def _no_aio_poller(timeout_s: float = 5.0) -> bool:
    """Let grpcio's aio poller thread end before a fork (bounded); whether it did. It lives
    while any aio channel or server object does, and a thread inside gRPC at the fork makes
    grpcio skip its fork handlers, so gRPC calls in the child never complete: on grpcio 1.50,
    after in-process aio tests, the poller stays for the rest of the process."""

    def gone() -> bool:
        gc.collect()
        return not any("_poll_wrapper" in thread.name for thread in threading.enumerate())

    return wait_for(gone, timeout_s)


def _in_child(work: Callable[[], None]) -> int:
    """Fork, run ``work`` in the child; its exit status (0: done), or -1 if it hung."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            signal.alarm(int(CHILD_S) + 5)  # a last resort should the parent be gone
            work()
            code = 0
        except BaseException:
            traceback.print_exc()  # to the test's captured stderr
        finally:
            os._exit(code)
    deadline = time.monotonic() + CHILD_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_every_lock_is_fresh_in_a_forked_child(held: Callable[..., None]) -> None:
    config = AffinityConfig(min_samples=5, dwell_calls=2, warmup_s=0)
    registry = AffinityRegistry(config)
    detector = registry.detector("svc:1")
    detector.expected_pods = 2
    alarms: list[Transition] = []
    telemetry = AffinityTelemetry(
        spans=False, metrics=False, on_alarm=alarms.append, alarm_interval_s=0
    )
    observer = CallObserver(detector, telemetry=telemetry)

    def calls(pods: str) -> None:
        for pod in pods:
            observer.begin("/svc.S/M", "unary_unary").finish([("x-balance-pod", pod)], None, 0)

    calls("a" * 10)  # pinned: the parent's alarm thread runs
    assert telemetry.flush(5) and len(alarms) == 1
    probe = PodProbe("127.0.0.1:1", detector, timeout_s=0.5)
    assert telemetry._alarms is not None
    for lock in (
        detector._lock,
        registry._lock,
        telemetry._lock,
        telemetry._alarms._wake,
        probe._lock,
    ):
        held(lock)

    def child() -> None:
        assert registry.detector("svc:1") is detector
        calls("ab" * 20)  # balanced
        assert detector.snapshot().calls == 50
        assert telemetry.flush(5)  # delivered by a new alarm thread, in the child
        assert len(alarms) > 1 and alarms[-1].current is AffinityState.BALANCED
        probe.maybe_probe(now=1e6)  # its lock is fresh: a round starts, and the join returns
        probe.join(5)
        # A round ends only if gRPC works in the child, which grpcio allows only when no thread
        # was inside gRPC at the fork.
        assert probe.rounds == 1 or not grpc_works_in_child

    grpc_works_in_child = _no_aio_poller()
    assert _in_child(child) == 0
