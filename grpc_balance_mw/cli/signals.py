"""SIGTERM unwinds ``grpc-balance`` the way Ctrl-C does, so every harness it started stops."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["sigterm_unwinds"]


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While inside, SIGTERM ends the program the way Ctrl-C does: by unwinding.

    Python's default for SIGTERM (what ``timeout``, CI runners and systemd send) is to die on the
    spot, running no ``finally`` and no ``atexit``; the harness's children live in sessions of
    their own, so nothing else would stop them (haproxy stays up, listening, its directory
    left). Here SIGTERM raises ``SystemExit(143)`` in the main thread instead, so every ``with
    LocalCluster(...)`` stops what it started. A second SIGTERM during that clean-up is ignored.
    Outside the main thread (where Python allows no signal handler) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
