"""What every way of observing a channel shares: its options, its observer, its target.

Sync and aio adapters both build their :class:`CallObserver` here, from one
:class:`ObserveOptions`, so the keyword list lives in one place and the two cannot drift.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import grpc

from grpc_balance_mw._grpcio import channel_target
from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.observer import CallObserver, CallTelemetry
from grpc_balance_mw.affinity.registry import AffinityRegistry, default_registry
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.identity import DEFAULT_POD_HEADERS, check_pod_headers
from grpc_balance_mw.probe import PodProbe, resolve_in_background

__all__ = [
    "ObserveOptions",
    "ObservedMethod",
    "Observes",
    "ObservingInterceptor",
    "build_observer",
    "channel_target",
    "chosen_options",
    "detector_for",
    "observe_parts",
]

R = TypeVar("R")

_lanes = itertools.count()

#: The default probe's rounds after the first, at most one per this many seconds.
AUTO_PROBE_INTERVAL_S = 300.0
#: The default probe's first round: enough fresh connections to tell one pod (or ClientIP)
#: from bad luck with two pods (all 16 on one of two: 1 in 32,768).
AUTO_PROBE_FIRST_CONNECTIONS = 16


@dataclass(frozen=True)
class ObserveOptions:
    """How a channel's calls are observed. Every field has a default that needs no set-up.

    Attributes:
        expected_pods: how many pods the target should have (e.g. the Deployment's replicas),
            if known: with it, one channel's pinning is recognised from its first calls.
        telemetry: an ``AffinityTelemetry`` for spans, metrics and alarms; None: detection only.
        probe: how the channel learns the pods it cannot see (one channel through a ClusterIP
            reaches one pod). ``"auto"`` (the default): a round of 16 fresh connections, each
            with one health check, all at once with the channel's first call (one round per
            target, whatever the number of channels to it), then a round of at
            most 24 every ``AUTO_PROBE_INTERVAL_S`` (5 minutes) while calls are made: each
            connection is a TCP and HTTP/2 handshake and one health check (about 2 ms of CPU,
            client and pod together), so about 30 ms once and at most 50 ms per 5 minutes
            after, on a daemon thread, never on the call path. It dials with
            ``probe_credentials``; without them only a target that speaks plaintext HTTP/2
            unasked is probed (a TLS server is never sent plaintext: the probe then stops and
            says once at INFO level how to give it credentials). True: a :class:`PodProbe`
            with its own defaults (a round every 30 s once calls are made; needs
            ``probe_credentials``); a configured :class:`PodProbe`; or False: none.
        probe_credentials: how the probe dials: the channel's own
            ``grpc.ChannelCredentials`` for a TLS target, or ``"insecure"`` for a plaintext
            one. Required with ``probe=True``: grpcio does not tell what credentials a channel
            was made with, and a guess would dial a TLS server in plaintext.
        probe_options: extra channel options for the probe's connections (e.g.
            ``grpc.ssl_target_name_override``, as the channel has them).
        config: thresholds and windows; the first config given for a target wins.
        registry: where the target's detector lives; default the process-wide registry.
        lane: the connection's name in telemetry; default ``lane-N``.
        pod_headers: the response headers that name the serving pod, in order: the first one
            a response carries names it. Default this package's own (``x-balance-pod``, which
            the server half stamps); a fleet that already returns its pod name in a header of
            its own names it here, e.g. ``("x-pod-name",)``.
    """

    expected_pods: int | None = None
    telemetry: CallTelemetry | None = None
    probe: PodProbe | bool | Literal["auto"] = "auto"
    probe_credentials: grpc.ChannelCredentials | Literal["insecure"] | None = None
    probe_options: tuple[tuple[str, Any], ...] = ()
    config: AffinityConfig | None = None
    registry: AffinityRegistry | None = None
    lane: str | None = None
    pod_headers: tuple[str, ...] = DEFAULT_POD_HEADERS

    def __post_init__(self) -> None:
        check_pod_headers(self.pod_headers)
        if not (isinstance(self.probe, bool | PodProbe) or self.probe == "auto"):
            raise ConfigurationError(
                f"ObserveOptions: probe must be 'auto', True, False or a PodProbe, "
                f"not {self.probe!r}"
            )
        if self.expected_pods is not None and (
            isinstance(self.expected_pods, bool)
            or not isinstance(self.expected_pods, int)
            or self.expected_pods < 1
        ):
            raise ConfigurationError(
                f"ObserveOptions: expected_pods must be an int >= 1 or None, "
                f"not {self.expected_pods!r}"
            )

        credentials = self.probe_credentials
        if credentials is not None and not (
            credentials == "insecure" or isinstance(credentials, grpc.ChannelCredentials)
        ):
            raise ConfigurationError(
                "ObserveOptions: probe_credentials must be grpc.ChannelCredentials or "
                f"'insecure', not {type(credentials).__name__}"
            )
        if self.probe is True and credentials is None:
            raise ConfigurationError(
                "ObserveOptions(probe=True) dials the target on connections of its own, and "
                "grpcio does not tell what credentials the channel has: pass them, "
                "ObserveOptions(probe=True, probe_credentials=<the channel's "
                "grpc.ssl_channel_credentials(...)>), or probe_credentials='insecure' for a "
                "plaintext channel"
            )

    def but(self, **changes: Any) -> ObserveOptions:
        """A copy with some fields changed (e.g. ``options.but(lane="lane-2")``)."""
        return replace(self, **changes)


class Observes:
    """What reports calls to one :class:`CallObserver` (a channel, interceptors), sync or aio."""

    observer: CallObserver

    @property
    def detector(self) -> AffinityDetector:
        return self.observer.detector


class ObservingInterceptor(Observes):
    """The interceptor form's share, sync and aio."""

    def close(self) -> None:
        """Stop the probe made for this interceptor (``probe=True``); closing the channel does
        not reach an interceptor, so call this when the channel is closed."""
        self.observer.close()


class ObservedMethod:
    """One method of an observed channel, sync or aio: the inner multicallable and the
    observer its calls are reported to."""

    def __init__(self, inner: Any, observer: CallObserver, method: str | bytes, kind: str) -> None:
        self._inner = inner
        self._observer = observer
        self._method = method
        self._kind = kind
        self._stream = kind != "unary_unary"


def chosen_options(observe: ObserveOptions | bool) -> ObserveOptions | None:
    """What a channel's ``observe=`` argument asks for: None for False, the defaults for True."""
    if observe is False:
        return None
    return observe if isinstance(observe, ObserveOptions) else ObserveOptions()


def detector_for(target: str, options: ObserveOptions) -> AffinityDetector:
    """The target's detector in the options' registry, told the expected pod count if any;
    the calls of channels closed before this one are forgotten (see
    :meth:`AffinityDetector.forget_closed_calls`)."""
    registry = options.registry if options.registry is not None else default_registry
    detector = registry.detector(target, options.config)
    detector.forget_closed_calls()
    if options.expected_pods is not None:
        detector.expected_pods = options.expected_pods
    return detector


def build_observer(
    target: str, options: ObserveOptions | None = None, *, fresh_connections: bool = False
) -> CallObserver:
    """The shared core behind one observed channel or one set of interceptors (sync or aio);
    ``fresh_connections``: every call it sees runs on a connection of its own."""
    options = options if options is not None else ObserveOptions()
    detector = detector_for(target, options)
    probe = options.probe
    auto = probe == "auto" and not fresh_connections  # fresh connections need no probe
    pod_probe = _own_probe(target, detector, options, auto) if probe is True or auto else None
    if isinstance(probe, PodProbe):
        pod_probe = probe
    resolve_in_background(detector)
    observer = CallObserver(
        detector,
        telemetry=options.telemetry,
        probe=pod_probe,
        lane=options.lane if options.lane is not None else f"lane-{next(_lanes)}",
        owns_probe=pod_probe is not None and pod_probe is not probe,
        fresh_connections=fresh_connections,
        pod_headers=options.pod_headers,
    )
    return observer


def _own_probe(
    target: str, detector: AffinityDetector, options: ObserveOptions, auto: bool
) -> PodProbe:
    """The probe ``probe=True`` or ``"auto"`` makes (see :class:`ObserveOptions`)."""
    credentials = options.probe_credentials
    given = None if credentials == "insecure" else credentials
    if not auto:
        return PodProbe(
            target,
            detector,
            credentials=given,
            options=options.probe_options,
            pod_headers=options.pod_headers,
        )
    return PodProbe(
        target,
        detector,
        interval_s=AUTO_PROBE_INTERVAL_S,
        credentials=given,
        options=options.probe_options,
        first_connections=AUTO_PROBE_FIRST_CONNECTIONS,
        plaintext_if_spoken=credentials is None,
        pod_headers=options.pod_headers,
        shared_schedule=True,
    )


def observe_parts(
    channel: Any,
    options: ObserveOptions | None,
    target: str | None,
    rebalance: Any,
    rebalancer: Callable[[str, AffinityDetector, ObserveOptions, Any], R],
) -> tuple[str, CallObserver, R | None]:
    """What ``observe()`` makes before it wraps ``channel``, the same in sync and aio: the
    target (learnt from the channel unless given), the observer, and a rebalancer if
    ``rebalance`` is given (``rebalancer``: the sync or aio driver). If the rebalancer cannot be
    made (a factory of the wrong form, say), the observer is closed before the error goes on.

    Raises:
        ConfigurationError: the target could not be learned from ``channel`` and was not given.
    """
    if target is None:
        target = channel_target(channel)
        if target is None:
            raise ConfigurationError(
                f"cannot tell the target of {type(channel).__name__}: pass observe(..., target=...)"
            )
    observer = build_observer(target, options)
    if rebalance is None:
        return target, observer, None
    try:
        driver = rebalancer(target, observer.detector, options or ObserveOptions(), rebalance)
    except BaseException:  # nothing left running
        observer.close()
        raise
    return target, observer, driver
