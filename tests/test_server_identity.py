"""The server middleware stamps the pod identity: every call kind, sync and aio, every outcome."""

from __future__ import annotations

import grpc
import pytest
from calls import ABORT, CALL_KINDS, OK, RAISE, call_aio, call_sync
from conftest import IDENTITY, AioPod, SyncPod

from grpc_balance_mw import POD_HEADER, POD_IP_HEADER, POD_NAMESPACE_HEADER, pod_from_metadata

OUTCOMES = {
    OK: grpc.StatusCode.OK,
    ABORT: grpc.StatusCode.FAILED_PRECONDITION,
    RAISE: grpc.StatusCode.UNKNOWN,
}


def _assert_stamped(seen, fail):  # type: ignore[no-untyped-def]
    assert seen.code == OUTCOMES[fail]
    for metadata in (seen.initial, seen.trailing):
        assert metadata[POD_HEADER] == IDENTITY.name
        assert metadata[POD_IP_HEADER] == IDENTITY.ip
        assert metadata[POD_NAMESPACE_HEADER] == IDENTITY.namespace
        assert pod_from_metadata(metadata.items()) == IDENTITY


@pytest.mark.parametrize("fail", list(OUTCOMES), ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", CALL_KINDS)
def test_sync_server_stamps_initial_and_trailing(sync_pod: SyncPod, kind: str, fail: int) -> None:
    with grpc.insecure_channel(sync_pod.target) as channel:
        seen = call_sync(channel, kind, fail)
    _assert_stamped(seen, fail)


@pytest.mark.parametrize("fail", list(OUTCOMES), ids=["ok", "abort", "raise"])
@pytest.mark.parametrize("kind", CALL_KINDS)
async def test_aio_server_stamps_initial_and_trailing(
    aio_pod: AioPod, kind: str, fail: int
) -> None:
    async with grpc.aio.insecure_channel(aio_pod.target) as channel:
        seen = await call_aio(channel, kind, fail)
    _assert_stamped(seen, fail)
