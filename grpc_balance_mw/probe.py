"""The pod probe: open new connections to the target, ask their health, read which pod answered.

A channel pinned to one pod never sees the others, so its calls alone cannot tell "pinned" from
"there is only one pod". The probe dials the same target on connections of its own (a local
subchannel pool, so it does not reuse the channel's connection), makes one
``grpc.health.v1.Health/Check`` on each, and reads ``x-balance-pod``: servers with the identity
middleware stamp health responses too. Each new connection through an L4 Service lands on a pod
of the balancer's choosing, so a round of a few finds the pods that exist, and where they landed
is connection evidence for the detector: fresh connections that all land on one pod while more
pods are known are the mark of ``sessionAffinity: ClientIP``, which the probe names in the log.

For a name (``dns:`` target, or a host name) each round also resolves it the way the channel
does and hands the answer to the detector (``set_dns_answer``): one address means a ClusterIP
Service (judged from the first call), several a headless Service. A headless Service's addresses
are then each dialed directly, so every ready pod is known by name within one round: a pod added
by a scale-up, and a pod gone from the answer, are learned at once (``pod_added``, ``pod_gone``).

Cost: one round is ``connections`` TCP + HTTP/2 handshakes and health checks, or one per
address of a headless answer (at most ``max_addresses``), about 2 ms each on loopback; at most
one round per ``interval_s`` (default 30 s). By default ``connections`` follows the pods known:
5 per pod known plus 5 (at least 3, at most ``max_connections``, 24): through a ClusterIP
Service with 3 pods, 20 connections, which reach a fourth pod added by a scale-up with
probability 1 - (3/4)^20 = 99.7 %, so it is learned by the first round after the scale-up
(three connections, the old default, found it 58 % of the time), and name ClientIP affinity in
one round. That is about 40 ms of CPU (client and pods together) per round: 0.15 % of one core
at the default interval. It runs on a daemon thread, never on the
call path, and never raises: a failed probe only means nothing new was learned.

``observe()`` makes one by default (``ObserveOptions(probe="auto")``): 16 connections at the
first call, enough to tell "one pod, or ClientIP affinity hiding the others" from bad luck, then
a round per 5 minutes on a schedule shared by every channel to the target. Told no credentials,
it first opens one TCP connection and sends nothing: a plaintext HTTP/2 server speaks first (its
SETTINGS frame), a TLS server waits for the client's hello, and is then never dialed at all
(:func:`speaks_plaintext_http2`).

:meth:`PodProbe.stop` (``close``) ends it: a round in flight has its health-check channels
closed, so it ends at once. A round dials its connections all at once, so it lasts about one
handshake and one health check, not one per connection.
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import grpc

from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.targets import literal_addresses
from grpc_balance_mw.errors import ConfigurationError, MalformedPodHeader
from grpc_balance_mw.headless import DnsTarget, parse_dns_target, resolve_addresses
from grpc_balance_mw.health_check import check_method
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS, pod_name_from_metadata

_log = logging.getLogger(__name__)

#: Forces a connection of the probe's own instead of sharing the global subchannel pool's.
LOCAL_POOL_OPTION = ("grpc.use_local_subchannel_pool", 1)


class PodProbe:
    """Finds pods behind ``target`` by dialing it anew, rate-limited, in the background.

    Args:
        target: the same target string the channel uses.
        detector: where the pods found go (``add_known_pods``).
        interval_s: at most one probe round per this many seconds.
        connections: new connections through the target per round; each may reach another pod.
            None (the default): 5 per pod known plus 5, at least 3 and at most
            ``max_connections`` (see the module's docstring for the odds). Three find all of 3
            pods in one round 22% of the time, and at least two of them 78%.
        max_connections: the most connections a round makes when ``connections`` is None.
        max_addresses: at most this many addresses of a headless answer are dialed per round.
        timeout_s: deadline of each health check.
        credentials: channel credentials for a TLS target; None for plaintext.
        options: extra channel options (e.g. the authority the target needs).
        first_connections: connections of the first round, if not as many as later ones: the
            default probe of ``observe()`` makes 16, enough to tell "one pod, or ClientIP" from
            bad luck (16 fresh connections all on one of two pods: 1 in 32,768).
        plaintext_if_spoken: without ``credentials``, dial in plaintext only if the target
            speaks HTTP/2 in clear unasked (see :func:`speaks_plaintext_http2`); if it does
            not (a TLS server waits for the client's hello), the probe stops and says once
            how to give it the channel's credentials. Nothing is ever sent in plaintext to a
            server that did not show it speaks plaintext.
        pod_headers: the response headers that name the pod, in order.
        shared_schedule: rounds follow the detector's schedule, not this probe's own: of the
            channels to one target (each with its probe), one round per ``interval_s`` in all;
            the probe then holds the detector weakly (it is the channels' to keep).
    """

    def __init__(
        self,
        target: str,
        detector: AffinityDetector,
        *,
        interval_s: float = 30.0,
        connections: int | None = None,
        max_connections: int = 24,
        max_addresses: int = 32,
        timeout_s: float = 2.0,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        first_connections: int | None = None,
        plaintext_if_spoken: bool = False,
        pod_headers: tuple[str, ...] = DEFAULT_POD_HEADERS,
        shared_schedule: bool = False,
    ) -> None:
        if (
            interval_s <= 0
            or (connections is not None and connections < 1)
            or max_connections < 3
            or max_addresses < 1
            or timeout_s <= 0
            or (first_connections is not None and first_connections < 1)
        ):
            raise ConfigurationError(
                "PodProbe needs interval_s > 0, connections >= 1 (or None), max_connections >= 3,"
                " max_addresses >= 1 and timeout_s > 0"
            )
        self.target = target
        # With a shared schedule (the probe observe() makes), held weakly: a round under way (a
        # DNS timeout, say) must not keep a closed channel's detector; a round whose detector
        # is gone ends. A probe made by hand holds the detector it was given.
        self._detector = weakref.ref(detector)
        self._held = None if shared_schedule else detector
        self.shared_schedule = shared_schedule
        self.interval_s = interval_s
        self.connections = connections
        self.max_connections = max_connections
        self.max_addresses = max_addresses
        self.timeout_s = timeout_s
        self._credentials = credentials
        self.first_connections = first_connections
        self._plaintext_unproven = plaintext_if_spoken and credentials is None
        self.pod_headers = pod_headers
        self._options = (*options, LOCAL_POOL_OPTION)
        self._dns_target = _name_of(target)
        self._lock = threading.Lock()
        self._next_at = 0.0
        self._running: threading.Thread | None = None
        self._dialing: list[grpc.Channel] = []
        self.stopped = False
        self.rounds = 0
        self.failures = 0
        forking.track(self)

    def reset_after_fork(self) -> None:
        """In a forked child: a fresh lock; the parent's round thread does not exist here."""
        self._lock = threading.Lock()
        self._running = None
        self._dialing = []

    def __repr__(self) -> str:
        stopped = ", stopped" if self.stopped else ""
        return f"<PodProbe {self.target} every {self.interval_s}s: {self.rounds} rounds{stopped}>"

    @property
    def detector(self) -> AffinityDetector:
        """Where the pods found go.

        Raises:
            ReferenceError: the detector was collected (every channel to the target is gone).
        """
        detector = self._detector()
        if detector is None:
            raise ReferenceError(f"the detector of {self.target} is gone")
        return detector

    def stop(self) -> None:
        """Probe no more; a round in flight ends at once (its channel is closed)."""
        with self._lock:
            self.stopped = True
            self._next_at = float("inf")
            dialing, self._dialing = self._dialing, []
        for channel in dialing:
            channel.close()  # cancels the health check in flight

    close = stop

    def maybe_probe(self, now: float) -> None:
        """Start a probe round in the background if one is due and none is running."""
        if now < self._next_at:  # the common case, without the lock
            return
        with self._lock:
            if now < self._next_at or self._running is not None or self.stopped:
                return
            if self.shared_schedule:
                detector = self._detector()
                if detector is None or now < detector.next_probe_at:
                    self._next_at = detector.next_probe_at if detector is not None else now
                    return
                detector.next_probe_at = now + self.interval_s
            self._next_at = now + self.interval_s
            running = threading.Thread(
                target=self._round, name=f"pod-probe {self.target}", daemon=True
            )
            # Started before it is published: ``join`` reads ``_running`` without the lock, and
            # joining a thread not yet started raises. The round's end waits for this lock.
            running.start()
            self._running = running

    def join(self, timeout: float | None = None) -> None:
        """Wait for a running round (for tests and shutdown)."""
        running = self._running
        if running is not None:
            running.join(timeout)

    def _round(self) -> None:
        try:
            if self.stopped or (self._plaintext_unproven and not self._prove_plaintext()):
                return
            if self._dns_target is None or not self._round_by_name(self._dns_target):
                pods = self.probe_once()
                if pods and not self.stopped:
                    self.detector.add_known_pods(pods)
                    self._name_affinity()
        except ReferenceError:  # every channel to the target is gone: nothing to tell
            self.stop()
        except Exception:  # a background thread: nothing above it would ever see the error
            if not self.stopped:  # stop() closing the channel under a round is no failure
                _log.exception("pod probe of %s failed", self.target)
        finally:
            with self._lock:
                self._running = None
                self.rounds += 1

    def _round_by_name(self, name: DnsTarget) -> bool:
        """Resolve the name; dial each address of a headless answer. False: dial the target."""
        addresses = resolve_addresses(name, self.timeout_s)
        if addresses is None or self.stopped:  # no answer is not "no pods"
            return False
        self.detector.set_dns_answer(addresses)
        if len(addresses) <= 1:  # a ClusterIP Service's name: fresh connections through it
            return False
        dialed = addresses[: self.max_addresses]
        pods = self._dial_all([_address_target(address, name.port) for address in dialed])
        found = [pod for pod in pods if pod is not None]
        if self.stopped:
            return True
        if found:
            self.detector.add_known_pods(found, fresh=False)
        if len(found) == len(addresses):  # every ready pod answered: the rest are gone
            gone = set(self.detector.snapshot().known_pods) - set(found)
            if gone:
                self.detector.forget_pods(sorted(gone))
        return True

    def _name_affinity(self) -> None:
        """Say once in the log what the round's connections showed, if it is a cause to fix:
        all on one pod while more are known (ClientIP), or with no other pod known (one pod or
        ClientIP); the detector words it from the one table of causes."""
        self.detector.announce()  # once per cause: the detector remembers what it said

    def _prove_plaintext(self) -> bool:
        """Whether the target showed it speaks plaintext HTTP/2 (checked once); if not, the
        probe stops, saying once how to give it credentials."""
        address = sniff_address(self.target, self.timeout_s)
        if address is not None and speaks_plaintext_http2(*address, self.timeout_s):
            self._plaintext_unproven = False
            return True
        self.stop()
        _log.info(
            "grpc_balance_mw: %s did not show it speaks plaintext HTTP/2 (a TLS server waits "
            "for the client), so observe() does not probe its pods; to count them, pass the "
            "channel's credentials: ObserveOptions(probe_credentials=...), or "
            "probe_credentials='insecure' for a plaintext server",
            self.target,
        )
        return False

    def connections_per_round(self) -> int:
        """How many new connections the next round makes (see ``connections``)."""
        if self.rounds == 0 and self.first_connections is not None:
            return self.first_connections
        if self.connections is not None:
            return self.connections
        known = self.detector.snapshot().known_count
        return min(self.max_connections, max(3, 5 * (known + 1)))

    def probe_once(self) -> list[str]:
        """Dial :meth:`connections_per_round` new connections at once; the pods that
        answered."""
        pods = self._dial_all([self.target] * self.connections_per_round())
        return [pod for pod in pods if pod is not None]

    def _open(self, target: str) -> grpc.Channel:
        options = self._options
        if target != self.target and self._dns_target is not None:
            # One pod's address: the authority (and TLS name) stays the Service's name.
            authority = f"{self._dns_target.host}:{self._dns_target.port}"
            options = (*options, ("grpc.default_authority", authority))
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def _dial_all(self, targets: list[str]) -> list[str | None]:
        """One health check on a fresh connection to each target, all under way at once (a
        round takes about one handshake's time, not one per connection); the pod each named."""
        channels = [self._open(target) for target in targets]
        with self._lock:
            if self.stopped:
                for channel in channels:
                    channel.close()
                return []
            self._dialing = channels  # for stop() to close
        try:
            calls = [
                check_method(channel).future("", timeout=self.timeout_s) for channel in channels
            ]
            return [self._pod_of(call) for call in calls]
        finally:
            with self._lock:
                if self._dialing is channels:
                    self._dialing = []
            for channel in channels:
                channel.close()

    def _dial(self, target: str) -> str | None:
        """One health check on a fresh connection to ``target``; the pod it named."""
        return self._dial_all([target])[0]

    def _pod_of(self, call: Any) -> str | None:
        """The pod a health check's answer named, None if none (or a malformed name)."""
        headers = self.pod_headers
        try:
            call.result()
            return pod_name_from_metadata(
                call.initial_metadata(), headers
            ) or pod_name_from_metadata(call.trailing_metadata(), headers)
        except grpc.RpcError as err:
            # An error status still carries the pod in its trailers if the pod answered.
            self.failures += 1
            try:
                return pod_name_from_metadata(err.trailing_metadata(), headers)
            except MalformedPodHeader:
                return None
        except MalformedPodHeader:
            self.failures += 1
            return None


def sniff_address(target: str, timeout_s: float = 2.0) -> tuple[str, int] | None:
    """The host and port a target's first connection goes to, for :func:`speaks_plaintext_http2`
    (a name resolved as the channel resolves it); None for what is not a TCP address
    (``unix:``, ``xds:``, ...) or a name that does not resolve."""
    name = _name_of(target)
    if name is not None:
        addresses = resolve_addresses(name, timeout_s)
        return (addresses[0], name.port) if addresses else None
    rest = target
    for scheme in ("ipv4:", "ipv6:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :].split(",")[0]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


#: The frame header of an HTTP/2 SETTINGS frame on stream 0: type 0x4 at byte 3, the stream
#: id (bytes 5-8) zero. A plaintext HTTP/2 server sends one first, before the client says
#: anything (RFC 9113 section 3.4: grpc-core, grpc-go, Netty, nghttp2 do so at once).
_SETTINGS_TYPE = 0x4


def speaks_plaintext_http2(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` opens with an HTTP/2 SETTINGS frame in clear, unasked.

    The client sends nothing: a TLS server says nothing until the client's hello, so it is never
    sent a plaintext byte; a plaintext gRPC server sends its SETTINGS frame at once. One TCP
    connection, closed at once.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            header = b""
            while len(header) < 9:
                chunk = connection.recv(9 - len(header))
                if not chunk:
                    return False
                header += chunk
    except OSError:
        return False
    return header[3] == _SETTINGS_TYPE and int.from_bytes(header[5:9], "big") & 0x7FFFFFFF == 0


class _Resolver:
    """Resolves targets' names one at a time on one daemon thread, which ends when idle.

    Bounded: at most ``_MAX_PENDING`` names wait (more are skipped: they keep the time-based
    warm-up), and a detector is held only weakly while it waits, so a channel closed meanwhile
    lets its detector go.
    """

    def __init__(self) -> None:
        self.reset_after_fork()
        forking.track(self)

    def reset_after_fork(self) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._pending: deque[tuple[weakref.ref[AffinityDetector], DnsTarget, float]] = deque()
        self._thread: threading.Thread | None = None

    def submit(self, detector: AffinityDetector, name: DnsTarget, timeout_s: float) -> bool:
        with self._wake:
            if len(self._pending) >= _MAX_PENDING:
                return False
            self._pending.append((weakref.ref(detector), name, timeout_s))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="grpc_balance_mw resolver", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    if not self._wake.wait(_RESOLVER_IDLE_S) and not self._pending:
                        self._thread = None
                        return
                ref, name, timeout_s = self._pending.popleft()
            if ref() is None:
                continue
            try:
                addresses = resolve_addresses(name, timeout_s)
                detector = ref()
                if addresses and detector is not None:
                    detector.set_dns_answer(addresses)
                del detector  # not held while the thread waits for the next name
            except Exception:  # a background thread: nothing above it would ever see the error
                _log.debug("could not resolve %s", name.host, exc_info=True)


_MAX_PENDING = 64
_RESOLVER_IDLE_S = 5.0
_resolver = _Resolver()


def resolve_in_background(detector: AffinityDetector, timeout_s: float = 2.0) -> bool:
    """Resolve a name target once per detector, off the call path (one shared thread).

    The answer's size decides how the target's lanes warm up and how pods switching between
    calls read (see ``AffinityConfig.warmup_s``); without it, a name keeps the time-based
    warm-up. Returns whether a resolution was queued.
    """
    if detector.addresses is not None or detector.resolution_started:
        return False
    detector.resolution_started = True
    name = _name_of(detector.target)
    return name is not None and _resolver.submit(detector, name, timeout_s)


def _name_of(target: str) -> DnsTarget | None:
    """The name a target resolves, or None for addresses (IP literals, ``ipv4:``, ``unix:``)."""
    if literal_addresses(target) is not None:
        return None
    if target.startswith("dns:"):
        return parse_dns_target(target)
    scheme = target.partition(":")[0]
    if scheme in ("xds", "google-c2p", "unix", "unix-abstract", "vsock", "ipv4", "ipv6"):
        return None
    return parse_dns_target(f"dns:///{target}")


def _address_target(address: str, port: int) -> str:
    return f"ipv6:[{address}]:{port}" if ":" in address else f"ipv4:{address}:{port}"
