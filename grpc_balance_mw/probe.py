"""The pod probe: open a new connection to the target, ask its health, read which pod answered.

A channel pinned to one pod never sees the others, so its calls alone cannot tell "pinned" from
"there is only one pod". The probe dials the same target on a connection of its own (a local
subchannel pool, so it does not reuse the channel's connection), makes one
``grpc.health.v1.Health/Check``, and reads ``x-balance-pod``: servers with the identity middleware
stamp health responses too. Each new connection through an L4 Service lands on a pod of the
balancer's choosing, so a few probes over time find the pods that exist.

For a headless target (``dns:`` with ``round_robin``) each round also resolves the name the way
the channel does and hands the answer to the detector (``set_dns_answer``): one A record per
ready pod is the best count of the pods that exist.

It runs on a daemon thread, at most once every ``interval_s``, never on the call path, and never
raises: a failed probe only means nothing new was learned. :meth:`PodProbe.stop` (``close``) ends
it: a round in flight has its health-check channel closed, so it ends at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import grpc

from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.errors import ConfigurationError, MalformedPodHeader
from grpc_balance_mw.headless import parse_dns_target, resolve_addresses
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.identity import pod_from_metadata

_log = logging.getLogger(__name__)

#: Forces a connection of the probe's own instead of sharing the global subchannel pool's.
LOCAL_POOL_OPTION = ("grpc.use_local_subchannel_pool", 1)


class PodProbe:
    """Finds pods behind ``target`` by dialing it anew, rate-limited, in the background.

    Args:
        target: the same target string the channel uses.
        detector: where the pods found go (``add_known_pods``).
        interval_s: at most one probe round per this many seconds.
        connections: new connections per round; each may reach another pod.
        timeout_s: deadline of each health check.
        credentials: channel credentials for a TLS target; None for plaintext.
        options: extra channel options (e.g. the authority the target needs).
    """

    def __init__(
        self,
        target: str,
        detector: AffinityDetector,
        *,
        interval_s: float = 30.0,
        connections: int = 1,
        timeout_s: float = 2.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if interval_s <= 0 or connections < 1 or timeout_s <= 0:
            raise ConfigurationError(
                "PodProbe needs interval_s > 0, connections >= 1 and timeout_s > 0"
            )
        self.target = target
        self.detector = detector
        self.interval_s = interval_s
        self.connections = connections
        self.timeout_s = timeout_s
        self._credentials = credentials
        self._options = (*options, LOCAL_POOL_OPTION)
        self._dns_target = parse_dns_target(target)
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._running: threading.Thread | None = None
        self._dialing: grpc.Channel | None = None
        self.stopped = False
        self.rounds = 0
        self.failures = 0
        forking.track(self)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock; the parent's round thread does not exist here."""
        self._lock = threading.Lock()
        self._running = None
        self._dialing = None

    def __repr__(self) -> str:
        stopped = ", stopped" if self.stopped else ""
        return f"<PodProbe {self.target} every {self.interval_s}s: {self.rounds} rounds{stopped}>"

    def stop(self) -> None:
        """Probe no more; a round in flight ends at once (its channel is closed)."""
        with self._lock:
            self.stopped = True
            self._next_at = float("inf")
            dialing, self._dialing = self._dialing, None
        if dialing is not None:
            dialing.close()  # cancels the health check in flight

    close = stop

    def maybe_probe(self, now: float) -> None:
        """Start a probe round in the background if one is due and none is running."""
        if now < self._next_at:  # the common case, without the lock
            return
        with self._lock:
            if now < self._next_at or self._running is not None or self.stopped:
                return
            self._next_at = now + self.interval_s
            self._running = threading.Thread(
                target=self._round, name=f"pod-probe {self.target}", daemon=True
            )
            self._running.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for a running round (for tests and shutdown)."""
        running = self._running
        if running is not None:
            running.join(timeout)

    def _round(self) -> None:
        try:
            if self._dns_target is not None:
                addresses = resolve_addresses(self._dns_target, self.timeout_s)
                if addresses is not None and not self.stopped:  # no answer is not "no pods"
                    self.detector.set_dns_answer(addresses)
            pods = self.probe_once()
            if pods and not self.stopped:
                self.detector.add_known_pods(pods)
        except Exception:  # a background thread: nothing above it would ever see the error
            if not self.stopped:  # stop() closing the channel under a round is no failure
                _log.exception("pod probe of %s failed", self.target)
        finally:
            with self._lock:
                self._running = None
                self.rounds += 1

    def probe_once(self) -> list[str]:
        """Dial ``connections`` new connections and return the pods that answered."""
        pods: list[str] = []
        for _ in range(self.connections):
            if self.stopped:
                break
            pod = self._dial()
            if pod is not None:
                pods.append(pod)
        return pods

    def _dial(self) -> str | None:
        channel = (
            grpc.secure_channel(self.target, self._credentials, options=self._options)
            if self._credentials is not None
            else grpc.insecure_channel(self.target, options=self._options)
        )
        with self._lock:
            if self.stopped:
                channel.close()
                return None
            self._dialing = channel  # for stop() to close
        try:
            _, call = check_method(channel).with_call("", timeout=self.timeout_s)
            identity = pod_from_metadata(call.initial_metadata()) or pod_from_metadata(
                call.trailing_metadata()
            )
        except grpc.RpcError as err:
            # An error status still carries the pod in its trailers if the pod answered.
            self.failures += 1
            try:
                identity = pod_from_metadata(err.trailing_metadata())
            except MalformedPodHeader:
                return None
        except MalformedPodHeader:
            self.failures += 1
            return None
        finally:
            with self._lock:
                if self._dialing is channel:
                    self._dialing = None
            channel.close()
        return identity.name if identity is not None else None
