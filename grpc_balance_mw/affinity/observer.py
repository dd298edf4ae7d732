"""What the sync and aio interceptors share: reading the pod from metadata and feeding the detector.

The adapters only know how to get metadata out of their kind of call; everything else happens
here, once, so the two cannot drift. No gRPC I/O: metadata comes in as ``(key, value)`` pairs.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

from grpc_balance_mw.affinity.detector import AffinityDetector, Clock, Counted
from grpc_balance_mw.affinity.lanes import ChannelLanes, LaneEvidence
from grpc_balance_mw.affinity.state import Transition
from grpc_balance_mw.errors import MalformedPodHeader
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS, IDENTITY_HEADERS, pod_name_from_metadata

#: ``grpc.StatusCode.UNAVAILABLE``'s number (this module imports no grpc).
UNAVAILABLE = 14

#: Response headers by which Envoy shows it balanced the call itself (per request, at L7).
ENVOY_TIME_HEADER = "x-envoy-upstream-service-time"
_WATCHED = frozenset((*IDENTITY_HEADERS, ENVOY_TIME_HEADER, "server"))


def _watched(headers: tuple[str, ...]) -> frozenset[str]:
    """The response headers a reader keeps: the pod headers, and the L7 proxies' marks."""
    if headers == DEFAULT_POD_HEADERS:
        return _WATCHED
    return _WATCHED | frozenset(headers)


#: Distinct header combinations remembered; a server that varies them per call cannot grow memory.
#: 4,096 keeps every pod of a 3,000-pod Deployment read from the cache (at 1,024 each call of
#: such a spread parsed its headers again: 17 us instead of 3.8 per call).
READINGS_CACHED = 4096

Metadata = Iterable[tuple[str, Any]]
UNARY_UNARY = "unary_unary"
CALL_KINDS = (UNARY_UNARY, "unary_stream", "stream_unary", "stream_stream")


class PodReading(NamedTuple):
    """What one metadata block says about the serving pod."""

    pod: str | None
    l7: bool
    malformed: bool


_NOTHING = PodReading(None, False, False)


class PodReader:
    """Reads pod identities from metadata, parsing each distinct header combination once.

    Args:
        headers: the response headers that name the pod, in order (see
            :func:`~grpc_balance_mw.identity.check_pod_headers`); default this package's own.
    """

    def __init__(self, headers: tuple[str, ...] = DEFAULT_POD_HEADERS) -> None:
        self.headers = headers
        self._watched = _watched(headers)
        self._cache: dict[tuple[tuple[str, Any], ...], PodReading] = {}
        #: Readings by whole metadata tuple as gRPC hands it over: a pod stamps the same
        #: headers on every response, so one dict lookup (``by_metadata.get``) usually reads it.
        self.by_metadata: dict[tuple[tuple[str, Any], ...], PodReading] = {}

    def read(self, metadata: Iterable[tuple[str, Any]] | None) -> PodReading:
        if type(metadata) is tuple:
            reading = self.by_metadata.get(metadata)
            if reading is None:
                reading = self._read(metadata)
                self._keep(metadata, reading)
            return reading
        return self._read(metadata)

    def read_trailers(self, metadata: Iterable[tuple[str, Any]] | None) -> PodReading:
        """:meth:`read` for trailers, which may hold something new on every call: the server
        half's load report (gRFC A51) is. A block seen whole before is one lookup; else its
        pod headers are read alone, and the block is kept whole only if they are all of it
        (a block kept per call would be a miss and a cache entry on every call)."""
        if type(metadata) is tuple:
            reading = self.by_metadata.get(metadata)
            if reading is not None:
                return reading
            reading = self._read(metadata)
            watched = self._watched
            if all(item[0] in watched for item in metadata):
                self._keep(metadata, reading)
            return reading
        return self._read(metadata)

    def _keep(self, metadata: tuple[tuple[str, Any], ...], reading: PodReading) -> None:
        if len(self.by_metadata) >= READINGS_CACHED:
            self.by_metadata.clear()
        self.by_metadata[metadata] = reading

    def _read(self, metadata: Iterable[tuple[str, Any]] | None) -> PodReading:
        found: list[tuple[str, Any]] | None = None
        watched = self._watched
        for item in metadata or ():
            if item[0] in watched:
                if found is None:
                    found = []
                found.append((item[0], item[1]))
        if found is None:
            return _NOTHING
        key = tuple(found)
        reading = self._cache.get(key)
        if reading is None:
            reading = self._parse(key)
            if len(self._cache) >= READINGS_CACHED:
                self._cache.clear()
            self._cache[key] = reading
        return reading

    def _parse(self, pairs: tuple[tuple[str, Any], ...]) -> PodReading:
        l7 = any(
            key == ENVOY_TIME_HEADER or (key == "server" and value in ("envoy", b"envoy"))
            for key, value in pairs
        )
        try:
            pod = pod_name_from_metadata(pairs, self.headers)
        except MalformedPodHeader:
            return PodReading(None, l7, True)
        return PodReading(pod, l7, False)


def merge_readings(first: PodReading, second: PodReading) -> PodReading:
    """Initial metadata's reading, completed by the trailing metadata's.

    A response names no pod and is malformed when either block's identity is malformed, or
    when headers and trailers name different pods: as with a header repeated with different
    values, a response that contradicts itself names no one. So a reading with a pod is never
    malformed.
    """
    if second is first or second is _NOTHING:
        return first
    l7 = first.l7 or second.l7
    if first.malformed or second.malformed:
        return PodReading(None, l7, True)
    if first.pod is None:
        return PodReading(second.pod, l7, False)
    if second.pod is not None and second.pod != first.pod:
        return PodReading(None, l7, True)
    return first if first.l7 == l7 else first._replace(l7=l7)


class MethodName(NamedTuple):
    full: str
    service: str
    method: str


def parse_method(raw: str | bytes) -> MethodName:
    """``/pkg.Service/Method`` (str, or bytes as grpc.aio gives it) split into its parts."""
    full = raw.decode() if isinstance(raw, bytes) else raw
    service, _, method = full.lstrip("/").rpartition("/")
    return MethodName(full, service, method)


class CallTelemetry(Protocol):
    """What the observer tells telemetry; implementations must never raise."""

    def watch(self, observer: CallObserver) -> None: ...

    def call_started(self, call: ObservedCall) -> None: ...

    def pod_seen(self, call: ObservedCall) -> None: ...

    def call_finished(
        self, call: ObservedCall, code: int | None, transition: Transition | None
    ) -> None: ...


class ProbeTrigger(Protocol):
    """Something that may look for more pods now; must return at once and never raise."""

    def maybe_probe(self, now: float) -> None: ...

    def stop(self) -> None: ...


class ObservedCall:
    """One call on its way: when it began, and what is known about its pod so far."""

    __slots__ = (
        "kind",
        "lane",
        "method",
        "observer",
        "reading",
        "span",
        "started",
        "telemetry_state",
    )

    def __init__(
        self,
        observer: CallObserver,
        method: MethodName,
        kind: str,
        now: float,
        lane: LaneEvidence | None = None,
    ) -> None:
        self.observer = observer
        self.method = method
        self.kind = kind
        self.started = now
        #: The lane (connection) the call runs on; None: a connection of its own.
        self.lane = lane
        self.reading: PodReading | None = None
        self.span: Any = None
        self.telemetry_state: Any = None

    @property
    def pod(self) -> str | None:
        return self.reading.pod if self.reading is not None else None

    def saw_initial_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """The response headers arrived: learn the pod now, before the call ends."""
        observer = self.observer
        self.reading = observer.reader.read(metadata)
        if self.reading.pod is not None and observer.telemetry is not None:
            observer.telemetry.pod_seen(self)

    def finish(
        self,
        initial: Metadata | None,
        trailing: Metadata | Callable[[], Metadata | None] | None,
        code: int | None,
    ) -> Transition | None:
        """The call ended: count it.

        Args:
            initial: the response's initial metadata (ignored if already seen).
            trailing: its trailing metadata, or a function that reads it (see
                :meth:`CallObserver.read_pod`).
            code: the status code's number, None if unknown.

        Returns:
            The state change this call caused; always None without telemetry, where the call
            is judged later (see ``AffinityDetector.count``).
        """
        observer = self.observer
        telemetry = observer.telemetry
        if telemetry is None:
            self.reading = observer.count(
                self.started, self.kind != UNARY_UNARY, initial, trailing, self.reading, self.lane
            )
            return None
        reading = self.reading = observer.read_pod(initial, trailing, self.reading)
        now = observer.clock()
        transition = observer.detector.record(
            reading.pod,
            duration_s=now - self.started,
            stream=self.kind != UNARY_UNARY,
            l7=reading.l7,
            malformed=reading.malformed,
            now=now,
            lane=self.lane,
        )
        telemetry.call_finished(self, code, transition)
        if code == UNAVAILABLE and reading.pod is None:
            observer.detector.unavailable(self.lane, now=now)
        if observer.probe is not None:
            observer.probe.maybe_probe(now)
        return transition


class CallObserver:
    """Watches the calls of one channel (one lane) to one target.

    Args:
        detector: the target's detector (shared with other channels to the same target).
        telemetry: spans, metrics and alarms, or None for detection only.
        probe: looks for pods the calls cannot see, or None.
        lane: names the connection in telemetry.
        clock: monotonic seconds, the same clock as the detector's.
        owns_probe: whether :meth:`close` stops the probe (one made for this observer); a
            probe passed in by the user is theirs to stop.
        fresh_connections: every call of this observer runs on a new connection.
        pod_headers: the response headers that name the pod, in order.
    """

    def __init__(
        self,
        detector: AffinityDetector,
        *,
        telemetry: CallTelemetry | None = None,
        probe: ProbeTrigger | None = None,
        lane: str | None = None,
        clock: Clock = time.monotonic,
        owns_probe: bool = False,
        fresh_connections: bool = False,
        pod_headers: tuple[str, ...] = DEFAULT_POD_HEADERS,
    ) -> None:
        self.detector = detector
        self.target = detector.target
        self.telemetry = telemetry
        self.probe = probe
        self.lane = lane
        self.clock = clock
        self.reader = PodReader(pod_headers)
        #: What this lane's calls showed, in order (fed by the detector, under its lock); None
        #: when every call has a connection of its own (dial-per-request): each call is then
        #: one connection's evidence, and pods changing from call to call mean nothing more.
        self.lane_evidence: LaneEvidence | None = None if fresh_connections else LaneEvidence(lane)
        #: The lanes of the channels an interceptor is installed on, the first being
        #: ``lane_evidence`` (see :meth:`lane_of`).
        self.channel_lanes = (
            ChannelLanes(self.lane_evidence) if self.lane_evidence is not None else None
        )
        self._methods: dict[str | bytes, MethodName] = {}
        #: For ``count_unary``, by initial metadata as gRPC hands it over, when the trailers
        #: first seen with it added nothing: its reading, those trailers, and what the detector
        #: is told of such a call (one tuple for all of them, see ``AffinityDetector.count_as``).
        #: A call that finds its headers here and its trailers equal is counted as
        #: ``(what, clock())`` in the detector's ``waiting`` queue, whoever counts it
        #: (``ObservedChannel`` inlines that).
        self.unary_calls: dict[Any, tuple[PodReading, Any, Counted]] = {}
        self._owns_probe = owns_probe
        #: Owned by ``telemetry``: what it keeps per observer (e.g. span attributes per method)
        #: lives and dies with the observer, so it never outlives a dropped channel.
        self.telemetry_cache: dict[Any, Any] = {}
        if telemetry is not None:
            telemetry.watch(self)
        detector.attach()
        #: Detaches from the detector exactly once: on :meth:`close`, or when the observer is
        #: collected (a lane's channel dropped, a channel never closed).
        self._detach = weakref.finalize(self, detector.detach)
        self._detach.atexit = False

    def __repr__(self) -> str:
        return f"<CallObserver {self.target} lane={self.lane} {self.detector.state.value}>"

    def close(self) -> None:
        """The channel is closed: stop the probe made for it, and a round in flight; its calls
        stop counting as evidence once no other channel feeds the detector."""
        if self.probe is not None and self._owns_probe:
            self.probe.stop()
        self._detach()

    def read_pod(
        self,
        initial: Metadata | None,
        trailing: Metadata | Callable[[], Metadata | None] | None,
        seen: PodReading | None = None,
    ) -> PodReading:
        """What a finished call's metadata says (``seen``: what its initial metadata said, if
        already read). The trailers are read too, so that headers and trailers naming
        different pods are caught (see :func:`merge_readings`)."""
        reader = self.reader
        reading = reader.read(initial) if seen is None else seen
        if trailing is not None:
            if callable(trailing):
                trailing = trailing()
            reading = merge_readings(reading, reader.read_trailers(trailing))
        return reading

    def count(
        self,
        started: float | None,
        stream: bool,
        initial: Metadata | None,
        trailing: Metadata | Callable[[], Metadata | None] | None,
        seen: PodReading | None = None,
        lane: LaneEvidence | None = None,
    ) -> PodReading:
        """Detection only (no telemetry): count a call that began at ``started`` and ended now,
        on ``lane`` (default: this observer's own). ``started`` may be None for a unary call:
        its duration weighs nothing (only a stream's does), and reading the clock for it costs.

        The lean way in for adapters on the hot path: no :class:`ObservedCall`, and the
        detector judges the call later, without its lock (``AffinityDetector.count``).
        """
        # The usual case: both blocks read before, as gRPC handed them over (tuples).
        by_metadata: dict[Any, PodReading] = self.reader.by_metadata
        try:
            reading = by_metadata[initial] if seen is None else seen
            trailer = _NOTHING if trailing is None else by_metadata.get(trailing)
            if trailer is None and type(trailing) is tuple:  # e.g. a per-call load report
                trailer = self.reader.read_trailers(trailing)
        except (KeyError, TypeError):  # headers not seen yet, or not a tuple
            trailer = None
        if trailer is None:  # read in full: new headers, trailers not seen yet or to fetch
            reading = self.read_pod(initial, trailing, seen)
        elif trailer is not reading and trailer is not _NOTHING:  # (a pod stamps both alike)
            reading = merge_readings(reading, trailer)
        now = self.clock()
        self.detector.count(
            reading.pod,
            0.0 if started is None else now - started,
            stream,
            reading.l7,
            reading.malformed,
            now,
            False,
            lane if lane is not None else self.lane_evidence,
        )
        if self.probe is not None:
            self.probe.maybe_probe(now)
        return reading

    def unavailable(
        self,
        initial: Metadata | None,
        trailing: Metadata | None,
        lane: LaneEvidence | None = None,
    ) -> None:
        """A call on ``lane`` (default: this observer's own) failed UNAVAILABLE: unless a pod
        named the response (it answered, so it is there), the lane's connection was refused or
        dropped, gone evidence for its pod (``AffinityDetector.unavailable``)."""
        if self.read_pod(initial, trailing).pod is None:
            self.detector.unavailable(lane if lane is not None else self.lane_evidence)

    def count_unary(self, initial: Metadata | None, trailing: Metadata | None) -> None:
        """``count(None, False, initial, trailing)``: a unary-unary call on this observer's own
        lane, the hot path of a channel under load. A call whose headers were seen before, with
        trailers that add nothing, costs a dict lookup, a clock reading and a queue entry."""
        try:
            reading, trailers, what = self.unary_calls[initial]
        except (KeyError, TypeError):  # headers not seen yet, or not a tuple
            self._count_unary_first(initial, trailing)
            return
        if trailing != trailers:  # e.g. a per-call load report: read the pod headers alone
            trailer = self.reader.read_trailers(trailing) if type(trailing) is tuple else None
            if trailer is not reading and trailer is not _NOTHING:  # not read, or news
                self.count(None, False, initial, trailing)
                return
        now = self.clock()
        self.detector.count_as(what, now)
        if self.probe is not None:
            self.probe.maybe_probe(now)

    def _count_unary_first(self, initial: Metadata | None, trailing: Metadata | None) -> None:
        reading = self.count(None, False, initial, trailing)
        if (
            type(initial) is tuple
            and (trailing is None or type(trailing) is tuple)
            # Only headers that say it all: trailers like these, or naming no pod, add nothing.
            and reading is self.reader.by_metadata.get(initial)
        ):
            unary = self.unary_calls
            if len(unary) >= READINGS_CACHED:  # a server that varies its headers per call
                unary.clear()
            what = (
                reading.pod,
                0.0,
                False,
                reading.l7,
                reading.malformed,
                False,
                self.lane_evidence,
            )
            unary[initial] = (reading, trailing, what)

    def lane_of(self, channel: object | None) -> LaneEvidence | None:
        """The lane of the calls made through ``channel``.

        A lane is a connection, and a channel has one at a time: an interceptor installed on
        several channels keeps a lane for each, named by the channel object (forgotten when it
        is collected; an object that cannot be weakly referenced, like grpc.aio's core channel,
        is forgotten only beyond ``ChannelLanes.limit``, and a later channel given its ``id``
        continues its lane, as a reconnect). None for ``channel``: this observer's own lane.
        """
        lanes = self.channel_lanes
        if channel is None or lanes is None:
            return self.lane_evidence
        key = id(channel)
        lane = lanes.get(key)
        if lane is None:
            lane = lanes.lane(key)
            with contextlib.suppress(TypeError):  # not weakly referenceable
                weakref.finalize(channel, lanes.forget, key)
        return lane

    def begin(
        self, raw_method: str | bytes, kind: str, channel: object | None = None
    ) -> ObservedCall:
        """A call starts; ``channel``: what it is made through, when this observer may watch
        several channels (see :meth:`lane_of`)."""
        method = self._methods.get(raw_method)
        if method is None:
            if len(self._methods) >= READINGS_CACHED:  # a generic client may name any method
                self._methods.clear()
            method = self._methods[raw_method] = parse_method(raw_method)
        lane = self.lane_evidence if channel is None else self.lane_of(channel)
        call = ObservedCall(self, method, kind, self.clock(), lane)
        if self.telemetry is not None:
            self.telemetry.call_started(call)
        return call
