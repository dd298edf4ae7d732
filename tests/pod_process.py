"""A sync charge-points pod (``conftest.SyncPod``: identity middleware and health) in a process
of its own, for tests that fork: a server in the test's own process always has a thread inside
gRPC, and gRPC then skips its fork handlers. Prints its port, serves until its stdin closes."""

from __future__ import annotations

import sys

from conftest import SyncPod


def main() -> None:
    pod = SyncPod()
    print(pod.port, flush=True)
    sys.stdin.read()
    pod.server.stop(None).wait()


if __name__ == "__main__":
    main()
