"""Pods that are not Python (examples/node, examples/go) behind the local Service, and the
measurements the tests of docs/identity.md make on them."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grpc_balance_mw import POD_HEADER, PodIdentity
from grpc_balance_mw.aio import balanced_channel as aio_balanced_channel
from grpc_balance_mw.balanced import balanced_channel
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.testing import Endpoint
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc
from grpc_balance_mw.testing.process import ChildProcess
from grpc_balance_mw.testing.userspace_proxy import UserspaceService

NAMESPACE = "ev"
#: Calls counted for the spread; the pods' fair share is a third.
SPREAD_CALLS = 300

#: The server's argv after its environment: it must listen on 127.0.0.1, port 0, and print
#: ``READY <port>``.
Command = Sequence[str]


class ForeignPod:
    """One server process on 127.0.0.1, port 0, whose identity comes from its environment.

    Args:
        command: the server's argv (listening on 127.0.0.1:0).
        log_dir: where its stderr goes.
        name: its pod name (``POD_NAME``); ``ip`` and the namespace go in ``POD_IP`` and
            ``POD_NAMESPACE``.
        env: more variables (``GRPC_BALANCE_POD_KEY``, ``DRAIN_SECONDS``...).
    """

    def __init__(
        self, command: Command, log_dir: Path, name: str, ip: str = "127.0.0.1", **env: str
    ) -> None:
        self.name = name
        self.ip = ip
        self.env = {"POD_NAME": name, "POD_IP": ip, "POD_NAMESPACE": NAMESPACE, **env}
        # `env -i`: the pod sees only its own identity, not whatever this shell has set.
        environment = [f"{key}={value}" for key, value in self.env.items()]
        self.process = ChildProcess(
            ["env", "-i", *environment, *command], name=f"pod-{name}", log_dir=log_dir
        )
        self.port = 0

    @property
    def identity(self) -> PodIdentity:
        return PodIdentity(name=self.name, ip=self.ip, namespace=NAMESPACE)

    def start(self) -> ForeignPod:
        self.process.start()
        return self

    def wait_ready(self) -> ForeignPod:
        # Node loads the protos with protobufjs at start-up: seconds on a busy machine.
        self.port = self.process.wait_ready(timeout=60)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop(grace_s=0.0)  # SIGKILL by pid and reap: no drain wanted here


class PodsBehindService:
    """Three pods behind the embedded userspace Service (per-connection, like kube-proxy)."""

    def __init__(self, command: Command, log_dir: Path, prefix: str) -> None:
        self.pods = [ForeignPod(command, log_dir, f"{prefix}-{i}") for i in range(3)]
        self.service = UserspaceService(log_dir)

    def start(self) -> PodsBehindService:
        for pod in self.pods:
            pod.start()
        for pod in self.pods:
            pod.wait_ready()
        self.service.start([Endpoint(p.name, "127.0.0.1", p.port) for p in self.pods])
        return self

    @property
    def names(self) -> set[str]:
        return {pod.name for pod in self.pods}

    def stop(self) -> None:
        self.service.stop()
        for pod in self.pods:
            pod.stop()


def covered_pods(channel: Any) -> set[str]:
    return {lane.pod for lane in channel.pool.lanes if lane.is_available() and lane.pod}


def wait_for_lanes(channel: Any, timeout_s: float = 20.0) -> None:
    """Until the lanes cover three pods (each learnt from a Health/Check's headers)."""
    deadline = time.monotonic() + timeout_s
    while len(covered_pods(channel)) < 3:
        assert time.monotonic() < deadline, f"lanes never covered 3 pods: {channel!r}"
        time.sleep(0.05)


def spread_sync(target: str) -> Counter[str]:
    """Which pod answered each of SPREAD_CALLS calls on a balanced channel, by response header."""
    channel = balanced_channel(target, observe=ObserveOptions(expected_pods=3))
    try:
        wait_for_lanes(channel)
        stub = pb_grpc.ChargePointsStub(channel)
        counts: Counter[str] = Counter()
        for _ in range(SPREAD_CALLS):
            _, call = stub.GetChargePoint.with_call(pb.GetChargePointRequest(id="cp"), timeout=10)
            counts[dict(call.initial_metadata())[POD_HEADER]] += 1
        return counts
    finally:
        channel.close()


async def _spread_aio(target: str) -> Counter[str]:
    channel = aio_balanced_channel(target, observe=ObserveOptions(expected_pods=3))
    try:
        await asyncio.to_thread(wait_for_lanes, channel)
        stub = pb_grpc.ChargePointsStub(channel)
        counts: Counter[str] = Counter()
        for _ in range(SPREAD_CALLS):
            call = stub.GetChargePoint(pb.GetChargePointRequest(id="cp"), timeout=10)
            await call
            counts[dict(tuple(await call.initial_metadata()))[POD_HEADER]] += 1
        return counts
    finally:
        await channel.close()


SPREADS: dict[str, Callable[[str], Counter[str]]] = {
    "sync": spread_sync,
    "aio": lambda target: asyncio.run(_spread_aio(target)),
}


def assert_spread_evenly(counts: Counter[str], names: set[str]) -> None:
    assert set(counts) == names, counts
    assert sum(counts.values()) == SPREAD_CALLS
    fair = SPREAD_CALLS / 3
    assert max(counts.values()) / fair < 1.3, counts
