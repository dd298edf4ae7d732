"""Runs the README's Python snippets as a reader pastes them, one after another in one module,
against a real pod: ``python tests/readme_snippets.py README.md TARGET``. Only the names a reader
brings are given (their generated stub, their server's executor, their target and credentials);
every other name must be imported by the snippets themselves. After each snippet that leaves a
``channel``, one call goes through it and the channel is closed. ``--skip-cluster`` leaves out
the LocalCluster snippet (it needs haproxy, dnsmasq and nginx), ``--only-cluster`` runs it alone."""

from __future__ import annotations

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

README_TARGET = "charge-points.ev.svc.cluster.local:80"


def snippets(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", Path(readme).read_text(), re.S)


def main(readme: str, target: str, mode: str) -> int:
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2 as pb
    from grpc_balance_mw.testing.charge_points.v1 import charge_points_pb2_grpc as pb_grpc

    namespace: dict[str, Any] = {
        "__name__": "__readme__",
        "ChargePointsStub": pb_grpc.ChargePointsStub,  # the reader's generated stub
        "pool": ThreadPoolExecutor(2),  # the reader's server executor
        "target": target,
        "credentials": None,
    }
    for number, code in enumerate(snippets(readme)):
        if ("LocalCluster(" in code) == (mode == "--skip-cluster"):
            continue
        namespace.pop("channel", None)
        exec(
            compile(code.replace(README_TARGET, target), f"README snippet {number}", "exec"),
            namespace,
        )
        channel = namespace.get("channel")
        if channel is not None and mode == "--only-cluster":  # its cluster has stopped
            channel.close()
            print(f"snippet {number}: ran", flush=True)
        elif channel is not None:
            stub = pb_grpc.ChargePointsStub(channel)
            reply = stub.GetChargePoint(pb.GetChargePointRequest(id="cp-1"), timeout=10)
            print(f"snippet {number}: served by a call -> {reply.id}", flush=True)
            channel.close()
        else:
            print(f"snippet {number}: ran", flush=True)
    namespace["pool"].shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
