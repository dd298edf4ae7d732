"""How a ``grpc.aio`` call ended, learned without awaiting it on the caller's path.

An observer that awaits a call (its headers, its status) from the caller's own coroutine changes
the call: a caller whose task is cancelled while it waits cancels the RPC with it, an interceptor
in front cannot cancel a call it has not been handed yet, and a call that fails before it starts
(a metadata value that is not a str) never completes, so the await hangs. grpc.aio's own calls
run their done-callbacks when the status is set, before any awaiting coroutine resumes: reading
the final state there keeps every behaviour of the call and still ends the observation before
an outer interceptor (opentelemetry-instrumentation-grpc) ends its span.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc

from grpc_balance_mw.aio._grpcio import call_starter, final_state, when_done

__all__ = ["Ended", "final_state", "read_end", "settle_followers", "when_ended"]

#: ``ended(initial metadata, trailing metadata, status code number)`` (its result is ignored);
#: all None for a call that failed before it started.
Ended = Callable[[Any, Any, "int | None"], object]

_CANCELLED = grpc.StatusCode.CANCELLED
_followers: set[asyncio.Task[None]] = set()


def when_ended(call: Any, ended: Ended) -> None:
    """Call ``ended`` once, when ``call`` ends: from its done-callback, or, if it fails before
    it starts, from the failure of grpc.aio's task that starts it (such a call runs its
    done-callbacks only if it is cancelled later, when its channel closes)."""
    once = _Once(ended)
    when_done(call, once.done)
    starter = call_starter(call)
    if starter is not None:
        starter.add_done_callback(partial(once.start_failed, call))


def read_end(ended: Ended, call: Any) -> None:
    """A done-callback: ``ended`` with ``call``'s final state."""
    state = final_state(call)
    if state is None:  # another grpcio's layout: await the finished call's state in a task
        task = asyncio.get_running_loop().create_task(_await_final_state(call, ended))
        _followers.add(task)
        task.add_done_callback(_followers.discard)
    else:
        ended(*state)


class _Once:
    """``ended`` for one call, called at most once whichever way the call ends."""

    __slots__ = ("_ended",)

    def __init__(self, ended: Ended) -> None:
        self._ended: Ended | None = ended

    def _take(self) -> Ended | None:
        ended, self._ended = self._ended, None
        return ended

    def done(self, call: Any) -> None:
        ended = self._take()
        if ended is not None:
            read_end(ended, call)

    def start_failed(self, call: Any, starter: asyncio.Future[Any]) -> None:
        # A starter that raised while the call has no status: the call never began (the
        # caller gets the exception from awaiting the call).
        if starter.cancelled() or starter.exception() is None or call.done():
            return
        ended = self._take()
        if ended is not None:
            ended(None, None, None)


async def _await_final_state(call: Any, ended: Ended) -> None:
    """The slow way for calls whose state cannot be read directly (another grpcio's layout)."""
    try:
        initial = await call.initial_metadata()
        code = await call.code()
        trailing = await call.trailing_metadata()
    except asyncio.CancelledError:
        initial, trailing, code = None, None, _CANCELLED
    ended(initial, trailing, code.value[0] if code is not None else None)


async def settle_followers() -> None:
    """Wait until the calls read the slow way have been read (for tests, shutdown)."""
    while _followers:
        followed = list(_followers)
        await asyncio.gather(*followed, return_exceptions=True)
        # Done: drop them here. Their discard callbacks may not have run yet: on Python 3.12+
        # gathering tasks that are already done does not yield to the loop.
        _followers.difference_update(followed)
