"""Fork safety: objects that hold locks (or background threads) reset them in a forked child.

A fork copies a lock in whatever state it was in; one that another thread held at that moment
stays held forever in the child, where that thread does not exist. grpcio's own fork support
expects libraries to reset such state in ``os.register_at_fork(after_in_child=...)``: objects
that :func:`track` themselves get their ``reset_after_fork()`` called there.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Protocol

_log = logging.getLogger(__name__)


class ForkSafe(Protocol):
    def reset_after_fork(self) -> None:
        """In the child, right after a fork: make fresh locks; forget threads of the parent."""


_tracked: weakref.WeakSet[ForkSafe] = weakref.WeakSet()


def track(instance: ForkSafe) -> None:
    """Reset ``instance`` in every child forked while it is alive."""
    _tracked.add(instance)


def _after_in_child() -> None:
    for instance in list(_tracked):
        try:
            instance.reset_after_fork()
        except Exception:  # one object failing must not leave the others locked
            _log.exception("could not reset %r after fork", instance)


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_in_child)
