"""Every test ends what it started: threads, child processes, sockets (conftest.py `no_leaks`).

A snapshot is taken before a test's function-scoped fixtures are set up (module- and
session-scoped fixtures are set up earlier, so what they own is in it) and compared after they are
torn down. What legitimately winds down after a close (grpc core closing sockets, an executor's
workers, a server's serving thread) is waited for, bounded; whatever is still there fails *that*
test, naming the leftovers, and is part of the next test's snapshot, so no later test fails for it.

The check is cheap when nothing is left (a thread list, one ``/proc`` read per thread, one
``readlink`` per descriptor); a garbage collection runs only when something is left, because
grpcio frees a dropped channel's or server's resources from its finaliser.

Ignored, each for a reason:

- grpcio's aio poller thread (``_poll_wrapper``): it starts with the first aio channel object and
  stops when the collector frees the last one, so its presence says when gc ran.
- sockets other than TCP: grpcio's aio poller wakes itself through an AF_UNIX pair that lives as
  long as the poller thread, and a name lookup's UDP socket ends with the lookup; what a test can
  leak that matters, connections and listeners, is TCP.
- zombie children: they have ended and hold nothing but their exit status; what matters is a
  process still running.

A module whose shared fixtures (a module-scoped local cluster, a pod with its executor) open
connections, restart pods or start executor threads during its tests says
``pytestmark = pytest.mark.leaks_per_module(reason="...")``: its tests are then checked together,
from before its first test to after its module-scoped fixtures are torn down, and a leak fails
the module's last test, naming the module.

Threads the package ends by itself once idle (the ``on_alarm`` worker, the name resolver) would
outlive the bounded wait at their production idle times; ``IDLE_WORKERS`` shortens those for the
tests (``short_idle_workers``), so such a thread must still end, only sooner.

A test that starts something meant to outlive it says so with
``@pytest.mark.leaves(threads=("name prefix", ...), processes=("in the command line", ...),
sockets=True, reason="...")``; only threads whose names start with a listed prefix, processes
whose command lines contain a listed part (and, with ``sockets=True``, its sockets) are then let
through, for that test only.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

WIND_DOWN_S = float(os.environ.get("GRPC_BALANCE_LEAK_WAIT_S", "5"))
"""How long leftovers may take to end after the test's fixtures are torn down."""

_IGNORED_THREAD_SUFFIXES = ("(_poll_wrapper)",)


IDLE_WORKERS = {
    # thread name: (module, the constant that bounds its idle life)
    "grpc_balance_mw on_alarm": ("grpc_balance_mw.telemetry", "_ALARM_THREAD_IDLE_S"),
    "grpc_balance_mw resolver": ("grpc_balance_mw.probe", "_RESOLVER_IDLE_S"),
}
IDLE_WORKER_S = 0.05
"""The idle life the tests give those threads (they end well inside ``WIND_DOWN_S``)."""


def short_idle_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give ``IDLE_WORKERS`` a short idle life (a missing constant fails: the table is stale)."""
    for module, constant in IDLE_WORKERS.values():
        monkeypatch.setattr(f"{module}.{constant}", IDLE_WORKER_S)


def live_threads() -> set[threading.Thread]:
    """Live threads, grpcio's aio poller aside (see the module docstring)."""
    return {
        thread
        for thread in threading.enumerate()
        if thread.is_alive() and not thread.name.endswith(_IGNORED_THREAD_SUFFIXES)
    }


def child_processes() -> dict[int, str]:
    """This process's running children (zombies aside): pid -> command line."""
    pids: set[int] = set()
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:  # not Linux: processes go unchecked
        return {}
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids.update(int(pid) for pid in children.read().split())
        except OSError:
            continue  # the thread ended while we looked
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                found[pid] = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it ended while we looked
    return found


def _tcp_sockets() -> dict[str, str]:
    """inode -> ``local -> remote (state)`` for this network namespace's TCP sockets."""
    found = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if len(fields) > 9:
                        local, remote = _address(fields[1]), _address(fields[2])
                        state = _TCP_STATES.get(fields[3], fields[3])
                        found[fields[9]] = f"{local} -> {remote} {state}"
        except (OSError, StopIteration):
            continue
    return found


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def _address(field: str) -> str:
    host, port = field.split(":")
    if host.startswith("0000000000000000FFFF0000"):  # an IPv4-mapped address (grpc's sockets)
        host = host[24:]
    # IPv4 is one little-endian word; other IPv6 addresses are not worth decoding here.
    ip = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0)) if len(host) == 8 else "v6"
    return f"{ip}:{int(port, 16)}"


def describe_sockets(sockets: Iterable[str]) -> list[str]:
    """``socket:[inode]`` names with their TCP addresses."""
    tcp = _tcp_sockets()
    return [f"{s} {tcp.get(s[len('socket:[') : -1], '(not TCP)')}" for s in sorted(sockets)]


def tcp_sockets(sockets: set[str]) -> set[str]:
    """The TCP ones among ``sockets`` (``socket:[inode]`` names)."""
    if not sockets:
        return sockets
    tcp = _tcp_sockets()
    return {s for s in sockets if s[len("socket:[") : -1] in tcp}


def open_sockets() -> set[str]:
    """This process's open sockets, as ``/proc/self/fd`` names them (``socket:[inode]``)."""
    found = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listing itself, or one closed meanwhile
        if link.startswith("socket:"):
            found.add(link)
    return found


@dataclass(frozen=True)
class Snapshot:
    threads: frozenset[threading.Thread]
    children: frozenset[int]
    sockets: frozenset[str]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(
            frozenset(live_threads()), frozenset(child_processes()), frozenset(open_sockets())
        )


def leftovers(
    before: Snapshot,
    allowed_thread_prefixes: Iterable[str] = (),
    allow_sockets: bool = False,
    allowed_commands: Iterable[str] = (),
) -> list[str]:
    """What is alive now and was not in ``before``; empty when nothing is left."""
    prefixes = tuple(allowed_thread_prefixes)
    commands = tuple(allowed_commands)
    threads = sorted(
        f"thread {t.name!r}"
        for t in live_threads() - before.threads
        if not (prefixes and t.name.startswith(prefixes))
    )
    processes = sorted(
        f"process {pid}: {cmd}"
        for pid, cmd in child_processes().items()
        if pid not in before.children and not any(part in cmd for part in commands)
    )
    sockets = [] if allow_sockets else sorted(tcp_sockets(open_sockets() - before.sockets))
    if sockets:
        sockets = [f"{len(sockets)} socket(s): " + ", ".join(describe_sockets(sockets[:5]))]
    return threads + processes + sockets


def wait_for_no_leftovers(
    before: Snapshot,
    allowed_thread_prefixes: Iterable[str] = (),
    allow_sockets: bool = False,
    allowed_commands: Iterable[str] = (),
    wait_s: float | None = None,
) -> list[str]:
    """Poll, bounded by ``wait_s`` (``WIND_DOWN_S``), until nothing new is left; what is left."""
    left = leftovers(before, allowed_thread_prefixes, allow_sockets, allowed_commands)
    if not left:
        return left
    deadline = time.monotonic() + (WIND_DOWN_S if wait_s is None else wait_s)
    # grpcio closes a dropped channel or server from its finaliser: collect, then poll for
    # what winds down, collecting again now and then (a collection is not free in a big heap).
    gc.collect()
    collected_at = time.monotonic()
    pause = 0.005
    while True:
        left = leftovers(before, allowed_thread_prefixes, allow_sockets, allowed_commands)
        now = time.monotonic()
        if not left or now >= deadline:
            return left
        time.sleep(min(pause, deadline - now))
        pause = min(pause * 2, 0.1)
        if time.monotonic() - collected_at >= 0.5:
            gc.collect()
            collected_at = time.monotonic()


def check_no_leaks(request: pytest.FixtureRequest, before: Snapshot) -> None:
    """Fail the running test, by name, if it left anything behind (see the module docstring)."""
    # The item keeps its fixtures' values until pytest drops them after this teardown; a torn
    # down server's executor threads end only when it is freed, so drop them now.
    funcargs = getattr(request.node, "funcargs", None)
    if isinstance(funcargs, dict):
        funcargs.clear()
    marker = request.node.get_closest_marker("leaves")
    allowed: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    allow_sockets = False
    if marker is not None:
        allowed = tuple(marker.kwargs.get("threads", ()))
        commands = tuple(marker.kwargs.get("processes", ()))
        allow_sockets = bool(marker.kwargs.get("sockets", False))
        if not marker.kwargs.get("reason"):
            pytest.fail("@pytest.mark.leaves needs a reason=", pytrace=False)
    left = wait_for_no_leftovers(before, allowed, allow_sockets, commands)
    if left:
        pytest.fail(
            f"{request.node.nodeid} left running after its teardown "
            f"(waited {WIND_DOWN_S:g} s): " + "; ".join(left),
            pytrace=False,
        )


def server_with_own_workers(workers: int, **kwargs: Any) -> grpc.Server:
    """``grpc.server`` on an executor of its own that ends with ``stop()``: grpcio 1.50's server
    keeps its executor for a while after the stop, and the idle workers would outlive the test
    that stopped it. ``stop(None)`` returns once the workers have ended; ``stop(grace)`` returns
    at once, as grpc's does, and its event is set once the server stopped and the workers ended."""
    executor = ThreadPoolExecutor(workers)
    server = grpc.server(executor, **kwargs)
    stop = server.stop

    def end_workers(done: threading.Event, ended: threading.Event) -> None:
        done.wait()
        executor.shutdown(wait=True)
        ended.set()

    def stop_and_end_workers(grace: float | None = None) -> threading.Event:
        done = stop(grace)
        ended = threading.Event()
        if grace is None:
            end_workers(done, ended)
        else:
            threading.Thread(
                target=end_workers, args=(done, ended), name="test-server-stop", daemon=True
            ).start()
        return ended

    server.stop = stop_and_end_workers  # type: ignore[method-assign]
    return server
