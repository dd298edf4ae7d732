"""What docs/concurrency.md claims, tested: a sync balanced channel serves many threads at once;
across ``os.fork()`` one made before the fork refuses calls in the child (clearly, even with its
pool's lock held at the fork) while one made in the child works, and the parent's carries on; an
aio balanced channel made outside a loop belongs to the first loop that uses it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from calls import call_aio, call_sync
from conftest import SyncPod
from test_fork import _in_child

from grpc_balance_mw.aio.channel import balanced_channel as aio_balanced_channel
from grpc_balance_mw.channel import ForkedChannelError, balanced_channel
from grpc_balance_mw.errors import BalanceError

OK = grpc.StatusCode.OK


def test_one_sync_balanced_channel_serves_many_threads(sync_pod: SyncPod) -> None:
    with balanced_channel(sync_pod.target, observe=False) as channel:
        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda _: call_sync(channel, "unary_stream").code, range(200)))
        assert codes == [OK] * 200
        assert all(lane.in_flight == 0 for lane in channel.pool.lanes)  # every call gave back


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_across_fork_the_parents_channel_is_refused_and_a_new_one_works(
    sync_pod: SyncPod,
) -> None:
    parent = balanced_channel(sync_pod.target, observe=False)
    assert call_sync(parent, "unary_unary").code is OK
    release, taken = threading.Event(), threading.Event()

    def hold() -> None:  # a thread inside the pool's lock at the moment of the fork
        with parent.pool._lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10)

    def child() -> None:
        try:
            call_sync(parent, "unary_unary", timeout=2)
        except ForkedChannelError as error:
            assert isinstance(error, BalanceError) and "os.fork" in str(error)
        else:
            raise AssertionError("the parent's channel took a call in the child")
        parent.close()  # returns: fresh locks, and the parent's connections are left alone
        with balanced_channel(sync_pod.target, observe=False) as own:
            assert call_sync(own, "unary_unary", timeout=5).code is OK

    try:
        assert _in_child(child) == 0
    finally:
        release.set()
        holder.join(10)
    assert call_sync(parent, "unary_unary").code is OK  # the parent's is untouched
    parent.close()


def test_an_aio_channel_made_outside_a_loop_belongs_to_the_first_loop_that_uses_it(
    sync_pod: SyncPod,
) -> None:
    channel = aio_balanced_channel(sync_pod.target, observe=False)

    async def use() -> grpc.StatusCode:
        return (await call_aio(channel, "unary_unary")).code

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(use()) is OK
        assert loop.run_until_complete(use()) is OK  # the same loop, again
        loop.run_until_complete(channel.close())
    finally:
        loop.close()
