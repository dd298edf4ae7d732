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


@dataclass(frozen=True)
class ObserveOptions:
    """How a channel's calls are observed. Every field has a default that needs no set-up.

    Attributes:
        expected_pods: how many pods the target should have (e.g. the Deployment's replicas),
            if known: with it, one channel's pinning is recognised from its first calls.
        telemetry: an ``AffinityTelemetry`` for spans, metrics and alarms; None: detection only.
        probe: True for a :class:`PodProbe` with defaults (a fresh connection and a health check
            now and then, to find pods the channel cannot see), or a configured one.
        probe_credentials: how the probe made by ``probe=True`` dials: the channel's own
            ``grpc.ChannelCredentials`` for a TLS target, or ``"insecure"`` for a plaintext
            one. Required with ``probe=True``: grpcio does not tell what credentials a channel
            was made with, and a guess would dial a TLS server in plaintext.
        probe_options: extra channel options for the probe's connections (e.g.
            ``grpc.ssl_target_name_override``, as the channel has them).
        config: thresholds and windows; the first config given for a target wins.
        registry: where the target's detector lives; default the process-wide registry.
        lane: the connection's name in telemetry; default ``lane-N``.
    """

    expected_pods: int | None = None
    telemetry: CallTelemetry | None = None
    probe: PodProbe | bool = False
    probe_credentials: grpc.ChannelCredentials | Literal["insecure"] | None = None
    probe_options: tuple[tuple[str, Any], ...] = ()
    config: AffinityConfig | None = None
    registry: AffinityRegistry | None = None
    lane: str | None = None

    def __post_init__(self) -> None:
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
    pod_probe = (
        PodProbe(
            target,
            detector,
            credentials=None
            if options.probe_credentials == "insecure"
            else options.probe_credentials,
            options=options.probe_options,
        )
        if probe is True
        else probe or None
    )
    resolve_in_background(detector)
    return CallObserver(
        detector,
        telemetry=options.telemetry,
        probe=pod_probe,
        lane=options.lane if options.lane is not None else f"lane-{next(_lanes)}",
        owns_probe=probe is True,
        fresh_connections=fresh_connections,
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
