"""Zero-code enablement: an OpenTelemetry instrumentor that observes every channel an application
makes, ``grpc`` and ``grpc.aio``.

``opentelemetry-instrument python app.py`` loads :class:`GrpcBalanceInstrumentor` from the
``opentelemetry_instrumentor`` entry point (name ``grpc_balance_mw``); in code,
``GrpcBalanceInstrumentor().instrument()`` does the same and ``.uninstrument()`` puts grpc's
functions back. Settings come from environment variables in OpenTelemetry's style (see
docs/instrumentor.md and :func:`settings_from_env`); a bad value is logged once as a
:class:`~grpc_balance_mw.errors.ConfigurationError` and left at its default, never raised into the
application.

It wraps ``grpc.insecure_channel`` / ``grpc.secure_channel`` and their ``grpc.aio`` forms: each
channel they make comes back from :func:`grpc_balance_mw.observe` (or its aio form). Composing
with opentelemetry-instrumentation-grpc, in either order, gives one structure, so one span per
call that carries the pod:

* sync: that instrumentation wraps the channel in its interceptor. Whichever wrapper runs first,
  the result is its interceptor outside the observed channel (an observed channel never sees the
  instrumented one), so its span is current while the pod is read and is enriched.
* aio: it adds its interceptors to the channel's own; the observed channel appends this
  package's after them.

Channels this package dials itself (a balanced channel's lanes, the probe's fresh connections)
and the OpenTelemetry SDK's exporters are never observed again here: they are told apart by the
module that asked for the channel.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import grpc
import grpc.aio
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from grpc_balance_mw import aio as balance_aio
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.instrumentation import instrumentation_parts
from grpc_balance_mw.observed_channel import observe
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.rebalance import Rebalance
from grpc_balance_mw.telemetry import AffinityTelemetry

__all__ = [
    "ENV_EXCLUDED_TARGETS",
    "ENV_EXPECTED_PODS",
    "ENV_REBALANCE",
    "ENV_TARGETS",
    "ENV_TELEMETRY",
    "GrpcBalanceInstrumentor",
    "InstrumentorSettings",
    "settings_from_env",
]

_log = logging.getLogger(__name__)

ENV_TARGETS = "OTEL_PYTHON_GRPC_BALANCE_TARGETS"
ENV_EXCLUDED_TARGETS = "OTEL_PYTHON_GRPC_BALANCE_EXCLUDED_TARGETS"
ENV_EXPECTED_PODS = "OTEL_PYTHON_GRPC_BALANCE_EXPECTED_PODS"
ENV_TELEMETRY = "OTEL_PYTHON_GRPC_BALANCE_TELEMETRY"
ENV_REBALANCE = "OTEL_PYTHON_GRPC_BALANCE_REBALANCE"

RebalanceWhen = Literal["alarm", "always"]
_REBALANCE_VALUES: dict[str, RebalanceWhen | None] = {
    "true": "alarm",
    "alarm": "alarm",
    "always": "always",
    "false": None,
}

#: Parameters of the functions wrapped, in order (grpcio's own, 1.50 to today).
_SYNC_PARAMETERS = {
    "insecure_channel": ("target", "options", "compression"),
    "secure_channel": ("target", "credentials", "options", "compression"),
}
_AIO_PARAMETERS = {name: (*names, "interceptors") for name, names in _SYNC_PARAMETERS.items()}

#: Modules whose channels are never observed here: this package's own (lanes, probes) and the
#: OpenTelemetry SDK's exporters (an observed exporter channel would trace its own exports).
_INTERNAL_CALLERS = ("grpc_balance_mw.", "opentelemetry.exporter.", "opentelemetry.sdk.")
#: Frames between the application and this wrapper: other wrappers of the same function.
_WRAPPER_FRAMES = ("opentelemetry.instrumentation.grpc", "wrapt", "functools", __name__)
#: Frames above the first caller that are looked at for an internal one (a factory of the
#: user's that this package calls to dial a lane is one frame below the package).
_CALLER_FRAMES = 4


@dataclass(frozen=True)
class InstrumentorSettings:
    """What the instrumentor observes and how; :func:`settings_from_env` reads it.

    Attributes:
        targets: glob patterns (``fnmatch``, case-sensitive) of the targets to observe, matched
            against the target string as the channel was made (and without a ``dns:///``
            prefix); empty: every target.
        excluded_targets: patterns of targets never observed; they win over ``targets``.
        expected_pods: (pattern, pods) pairs; the first pattern that matches a target gives its
            ``ObserveOptions.expected_pods``.
        telemetry: spans, metrics and the alarm's log lines (an ``AffinityTelemetry``); False:
            detection only.
        rebalance: ``"alarm"`` or ``"always"``: every observed channel moves its calls onto lanes
            of a balanced channel, as ``observe(..., rebalance=Rebalance(factory, when=...))``;
            None: observe only.
    """

    targets: tuple[str, ...] = ()
    excluded_targets: tuple[str, ...] = ()
    expected_pods: tuple[tuple[str, int], ...] = ()
    telemetry: bool = True
    rebalance: RebalanceWhen | None = None

    def selects(self, target: str) -> bool:
        """Whether channels to ``target`` are observed."""
        if any(_matches(pattern, target) for pattern in self.excluded_targets):
            return False
        return not self.targets or any(_matches(pattern, target) for pattern in self.targets)

    def expected_pods_for(self, target: str) -> int | None:
        """The pods ``target`` should have, if a setting names it."""
        for pattern, pods in self.expected_pods:
            if _matches(pattern, target):
                return pods
        return None


def _matches(pattern: str, target: str) -> bool:
    bare = target.removeprefix("dns:///")
    return fnmatch.fnmatchcase(target, pattern) or fnmatch.fnmatchcase(bare, pattern)


def _patterns(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _expected_pods(name: str, value: str) -> tuple[tuple[tuple[str, int], ...], list[str]]:
    pairs: list[tuple[str, int]] = []
    errors: list[str] = []
    for entry in _patterns(value):
        pattern, equals, count = entry.rpartition("=")
        pods = int(count) if count.strip().isdigit() else 0
        if not equals or not pattern.strip() or pods < 1:
            errors.append(f"{name}: {entry!r} is not TARGET=PODS with PODS an integer >= 1")
            continue
        pairs.append((pattern.strip(), pods))
    return tuple(pairs), errors


def settings_from_env(
    environ: Mapping[str, str] | None = None,
) -> tuple[InstrumentorSettings, list[ConfigurationError]]:
    """The settings the environment asks for, and what was wrong in it (each bad value is left
    at its default; the instrumentor logs these errors and goes on).

    ``OTEL_PYTHON_GRPC_BALANCE_TARGETS`` / ``..._EXCLUDED_TARGETS``: comma-separated glob
    patterns. ``..._EXPECTED_PODS``: ``target=pods`` pairs, comma-separated.
    ``..._TELEMETRY``: ``true`` (default) or ``false``. ``..._REBALANCE``: ``false`` (default),
    ``true`` or ``alarm`` (move on the affinity alarm), ``always``.
    """
    env = os.environ if environ is None else environ
    errors: list[str] = []
    expected, bad_pairs = _expected_pods(ENV_EXPECTED_PODS, env.get(ENV_EXPECTED_PODS, ""))
    errors += bad_pairs
    telemetry = True
    raw_telemetry = env.get(ENV_TELEMETRY, "").strip().lower()
    if raw_telemetry in ("true", "false"):
        telemetry = raw_telemetry == "true"
    elif raw_telemetry:
        errors.append(f"{ENV_TELEMETRY}: {env[ENV_TELEMETRY]!r} is neither true nor false")
    rebalance: RebalanceWhen | None = None
    raw_rebalance = env.get(ENV_REBALANCE, "").strip().lower()
    if raw_rebalance in _REBALANCE_VALUES:
        rebalance = _REBALANCE_VALUES[raw_rebalance]
    elif raw_rebalance:
        errors.append(
            f"{ENV_REBALANCE}: {env[ENV_REBALANCE]!r} is not one of false, true, alarm, always"
        )
    settings = InstrumentorSettings(
        targets=_patterns(env.get(ENV_TARGETS, "")),
        excluded_targets=_patterns(env.get(ENV_EXCLUDED_TARGETS, "")),
        expected_pods=expected,
        telemetry=telemetry,
        rebalance=rebalance,
    )
    return settings, [ConfigurationError(f"{message}; ignored") for message in errors]


def _dialled_internally() -> bool:
    """Whether the channel being made was asked for by this package or the OpenTelemetry SDK
    (looked at from inside a wrapper: the wrapper frames are skipped first)."""
    try:
        frame = sys._getframe(2)
    except ValueError:  # called with no Python caller at all
        return False
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_WRAPPER_FRAMES):
        frame = frame.f_back  # type: ignore[assignment]
    for _ in range(_CALLER_FRAMES):
        if frame is None:
            return False
        if str(frame.f_globals.get("__name__", "")).startswith(_INTERNAL_CALLERS):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _bound(parameters: Sequence[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The arguments of a channel function by name (its defaults None)."""
    named: dict[str, Any] = dict.fromkeys(parameters)
    named.update(zip(parameters, args, strict=False))  # fewer args than names
    named.update(kwargs)
    return named


def _lane_factory(dial: Callable[..., Any], named: dict[str, Any]) -> Callable[..., Any]:
    """What a rebalanced channel dials its lanes with: the user's target, credentials, options
    and compression, plus the lane's options (and, aio, its interceptors after the user's).

    ``dial`` is grpcio's own function for sync channels: the span of a moved call is the one
    outside the observed channel, and a lane of its own would add a second. For aio it is the
    function below this wrapper: the interceptors the user (or opentelemetry-instrumentation-grpc)
    gave the channel run inside it, so the lanes need them too.
    """
    head: tuple[Any, ...] = (named["target"],)
    if named.get("credentials") is not None:
        head = (*head, named["credentials"])
    base = tuple(named.get("options") or ())
    compression = named.get("compression")
    if "interceptors" not in named:

        def sync_lane(extra: Sequence[tuple[str, Any]], interceptors: Sequence[Any] = ()) -> Any:
            channel = dial(*head, options=(*base, *extra), compression=compression)
            return grpc.intercept_channel(channel, *interceptors) if interceptors else channel

        return sync_lane
    given = list(named.get("interceptors") or ())

    def aio_lane(extra: Sequence[tuple[str, Any]], interceptors: Sequence[Any]) -> Any:
        return dial(
            *head,
            options=(*base, *extra),
            compression=compression,
            interceptors=[*given, *interceptors],
        )

    return aio_lane


class _Patch:
    """One grpc function replaced by a wrapper; removing it puts the function back, or, when
    something else wrapped it since (another instrumentor), leaves the wrapper passing through."""

    def __init__(self, module: ModuleType, name: str, wrap: Callable[[_Patch], Any]) -> None:
        self.module = module
        self.name = name
        self.previous: Callable[..., Any] = getattr(module, name)
        self.active = True
        self.installed = wrap(self)
        setattr(module, name, self.installed)

    def remove(self) -> None:
        self.active = False
        if getattr(self.module, self.name) is self.installed:
            setattr(self.module, self.name, self.previous)


class GrpcBalanceInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Observes every ``grpc`` and ``grpc.aio`` channel the application makes.

    ``instrument()`` takes, besides OpenTelemetry's ``tracer_provider`` and ``meter_provider``:
    ``settings`` (an :class:`InstrumentorSettings`, instead of the environment) and
    ``telemetry`` (an ``AffinityTelemetry`` of your own, e.g. with an ``on_alarm``).
    Uninstrument in the reverse order of instrumenting to get grpc's functions back exactly;
    in another order this wrapper stays in place, passing channels through.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("grpcio >= 1.53.0",)

    def _instrument(self, **kwargs: Any) -> None:
        settings = kwargs.get("settings")
        if not isinstance(settings, InstrumentorSettings):
            settings, errors = settings_from_env()
            for error in errors:
                _log.error("grpc_balance_mw instrumentor: %s", error)
        telemetry = kwargs.get("telemetry")  # one given wins over the setting
        if telemetry is None and settings.telemetry:
            telemetry = AffinityTelemetry(
                tracer_provider=kwargs.get("tracer_provider"),
                meter_provider=kwargs.get("meter_provider"),
            )
        self._settings = settings
        self._telemetry = telemetry
        self._failures_logged = False
        self._patches = [
            *(_Patch(grpc, name, self._sync_wrapper) for name in _SYNC_PARAMETERS),
            *(_Patch(grpc.aio, name, self._aio_wrapper) for name in _AIO_PARAMETERS),
        ]

    def _uninstrument(self, **kwargs: Any) -> None:
        for patch in reversed(self._patches):
            patch.remove()
        self._patches = []

    # the wrappers

    def _sync_wrapper(self, patch: _Patch) -> Callable[..., Any]:
        raw = inspect.unwrap(patch.previous)  # grpcio's own, below every wrapper
        return self._wrapper(
            patch,
            _SYNC_PARAMETERS[patch.name],
            lambda channel, named: self._observe_sync(channel, named, raw),
        )

    def _aio_wrapper(self, patch: _Patch) -> Callable[..., Any]:
        return self._wrapper(
            patch,
            _AIO_PARAMETERS[patch.name],
            lambda channel, named: balance_aio.observe(
                channel,
                self._options(named["target"]),
                target=named["target"],
                rebalance=self._rebalance(patch.previous, named),
            ),
        )

    def _wrapper(
        self,
        patch: _Patch,
        parameters: Sequence[str],
        observe_it: Callable[[Any, dict[str, Any]], Any],
    ) -> Callable[..., Any]:
        """``patch``'s function, its channels passed to ``observe_it(channel, arguments)``
        when their target is selected; as made if that fails."""
        previous = patch.previous

        @functools.wraps(previous)
        def make_channel(*args: Any, **kwargs: Any) -> Any:
            channel = previous(*args, **kwargs)
            if not patch.active or _dialled_internally():
                return channel
            named = _bound(parameters, args, kwargs)
            target = named["target"]
            if not isinstance(target, str) or not self._settings.selects(target):
                return channel
            try:
                return observe_it(channel, named)
            except Exception:  # the instrumentation must never fail the application's channel
                level = logging.DEBUG if self._failures_logged else logging.WARNING
                self._failures_logged = True
                _log.log(
                    level, "grpc_balance_mw: channel to %r left unobserved", target, exc_info=True
                )
                return channel

        return make_channel

    def _observe_sync(self, channel: Any, named: dict[str, Any], raw: Callable[..., Any]) -> Any:
        target = named["target"]
        options = self._options(target)
        rebalance = self._rebalance(raw, named)
        instrumented = instrumentation_parts(channel)
        if instrumented is None:
            return observe(channel, options, target=target, rebalance=rebalance)
        # opentelemetry-instrumentation-grpc wrapped the channel before this wrapper saw it:
        # observe the channel it wraps and put its interceptor back outside, the structure it
        # makes when it wraps this wrapper's channel instead.
        inner, interceptor, intercept = instrumented
        return intercept(observe(inner, options, target=target, rebalance=rebalance), interceptor)

    def _options(self, target: str) -> ObserveOptions:
        return ObserveOptions(
            expected_pods=self._settings.expected_pods_for(target), telemetry=self._telemetry
        )

    def _rebalance(self, dial: Callable[..., Any], named: dict[str, Any]) -> Rebalance | None:
        when = self._settings.rebalance
        if when is None:
            return None
        return Rebalance(_lane_factory(dial, named), when=when)
