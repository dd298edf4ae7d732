"""What the default picker costs the client: ``Weighted`` against ``LeastOutstanding``.

``python scripts/picker_cost.py [--rounds 30] [--calls 200] [--service haproxy|iptables]``

Three pods of the embedded local cluster (each sends a load report with every call, which
``Weighted`` reads) behind an L4 Service; one caller makes back-to-back unary calls through a
balanced channel with each picker and through a native ``round_robin`` channel, in rounds of
``--calls`` calls whose order is shuffled each round, so drift in the machine's speed hits them
all alike. Prints each channel's median client CPU per call and the median per-round ratios,
with their quartiles (issue 23's steady state: weighted / least-outstanding at most 1.03).
"""

from __future__ import annotations

import argparse
import random
import statistics
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, cast

import grpc

from grpc_balance_mw import AffinityRegistry, ObserveOptions, balanced_channel
from grpc_balance_mw.cli import overhead_balanced as ob
from grpc_balance_mw.pool.pickers import LeastOutstanding, Weighted
from grpc_balance_mw.testing import LocalCluster
from grpc_balance_mw.testing.cluster import ServiceKind

PICKERS: dict[str, Callable[[], Any]] = {
    "weighted": Weighted,
    "least-outstanding": LeastOutstanding,
}


def measure(rounds: int, calls: int, service: str) -> dict[str, list[float]]:
    """Client CPU per call (us) of each channel, one figure per round."""
    kind = cast(ServiceKind, service)
    with LocalCluster(3, service=kind, dns=None) as cluster, ExitStack() as stack:
        native = grpc.insecure_channel(ob._native_target(cluster), ob._NATIVE_OPTIONS)
        channels: dict[str, Any] = {"native-rr": stack.enter_context(native)}
        for name, picker in PICKERS.items():
            options = ObserveOptions(expected_pods=3, registry=AffinityRegistry())
            channel = balanced_channel(cluster.service_target, observe=options, picker=picker())
            ob._wait_lanes(stack.enter_context(channel).pool)
            channels[name] = channel
        rpcs = {name: ob._unary(channel) for name, channel in channels.items()}
        for rpc in rpcs.values():  # warm up, and the weights' 10 s blackout starts
            ob._one_caller(rpc, 300)
        per: dict[str, list[float]] = {name: [] for name in rpcs}
        names = list(rpcs)
        for _ in range(rounds):
            random.shuffle(names)
            for name in names:
                cpu, _ = ob._one_caller(rpcs[name], calls)
                per[name].append(cpu / calls * 1e6)
        if not channels["weighted"].pool.picker.weighing:
            print("note: the weighted picker had no usable weights (fewer than 10 s of reports)")
        return per


def ratio(per: dict[str, list[float]], a: str, b: str) -> str:
    """The median per-round ratio ``a / b``, with its quartiles."""
    ordered = sorted(x / y for x, y in zip(per[a], per[b], strict=True))
    n = len(ordered)
    return f"{ordered[n // 2]:.3f} [{ordered[n // 4]:.3f}-{ordered[3 * n // 4]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument(
        "--service", choices=("haproxy", "iptables", "userspace"), default="haproxy"
    )
    args = parser.parse_args()
    if not 1 <= args.rounds <= 1000 or not 10 <= args.calls <= 100_000:
        parser.error("need 1 <= --rounds <= 1000 and 10 <= --calls <= 100000")
    per = measure(args.rounds, args.calls, args.service)
    for name, values in per.items():
        print(f"{name:18s} {statistics.median(values):7.1f} us of client CPU per call")
    print("weighted / least-outstanding ", ratio(per, "weighted", "least-outstanding"))
    print("weighted / native-rr         ", ratio(per, "weighted", "native-rr"))
    print("least-outstanding / native-rr", ratio(per, "least-outstanding", "native-rr"))


if __name__ == "__main__":
    main()
