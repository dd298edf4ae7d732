"""When and how an observed channel's calls move onto lanes, for both flavours: the settings
(:class:`Rebalance`), the decision and the move (:class:`RebalanceCore`) and a method that follows
it (:class:`Rerouted`). No grpc I/O and no channel flavour here: the sync driver is
:mod:`grpc_balance_mw.rebalance`, the ``grpc.aio`` one :mod:`grpc_balance_mw.aio.rebalance`;
each brings its balanced channel, so neither flavour imports the other's adapters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from grpc_balance_mw._routing import MethodSpec, can_call, check_form
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.errors import ConfigurationError
from grpc_balance_mw.observing import ObserveOptions
from grpc_balance_mw.pool import LanePool, Picker, PoolConfig, Rotation
from grpc_balance_mw.pool.pool import pool_for_channel
from grpc_balance_mw.retry import NO_RETRY, RetryPolicy

__all__ = ["Rebalance", "RebalanceCore", "Rerouted"]

#: The remedy's own logger name, whichever module logs.
_log = logging.getLogger("grpc_balance_mw.rebalance")


@dataclass(frozen=True)
class Rebalance:
    """When and how an observed channel moves its calls onto lanes; the same for sync and aio.

    Attributes:
        factory: makes one more channel like the user's, called as ``factory(extra_options,
            interceptors)`` in both flavours (:data:`grpc_balance_mw.balanced.ChannelFactory`):
            each lane adds ``grpc.use_local_subchannel_pool`` so it gets a connection of its
            own; ``grpc.aio`` lanes pass interceptors that observe the lane, sync lanes none.
            E.g. ``channel_factory(target, creds, options)`` of the flavour, or ``lambda extra,
            interceptors: grpc.secure_channel(target, creds, options=[*mine, *extra])``; a sync
            ``factory(extra)`` is still accepted for one release (deprecated). Calls that moved
            run through these channels only: give them what the user's channel has
            (credentials, options, interceptors of your own).
        when: ``"alarm"``: once the detector says pinned or skewed; ``"always"``: from the start.
        lanes: lanes kept at least (see ``balanced_channel``).
        max_lanes: lanes kept at most while following the pods known.
        picker: the lane per call (``Weighted()`` by default).
        rotation: when lanes are replaced (the balanced channel's default by default).
        retry: which calls are sent again on another lane when an attempt fails, as
            ``balanced_channel(retry=)`` does (a SIGKILLed pod then costs no retryable call);
            it applies to calls once they moved (the user's channel retries as it was made to).
        check_interval_s: how often the detector's state is looked at (off the call path).
    """

    factory: Callable[..., Any]
    when: Literal["alarm", "always"] = "alarm"
    lanes: int = 3
    max_lanes: int = 8
    picker: Picker | None = None
    rotation: Rotation | None = None
    retry: RetryPolicy = NO_RETRY
    check_interval_s: float = 0.1

    def __post_init__(self) -> None:
        if not callable(self.factory):
            raise ConfigurationError("Rebalance: factory must be a callable making a channel")
        if self.when not in ("alarm", "always"):
            raise ConfigurationError("Rebalance: when must be 'alarm' or 'always'")
        if not self.check_interval_s > 0:
            raise ConfigurationError("Rebalance: check_interval_s must be > 0")
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError(
                f"Rebalance: retry must be a RetryPolicy, not {type(self.retry).__name__}"
            )
        # Said now, not when the alarm comes on a background thread: the pool's own checks.
        PoolConfig(min_lanes=self.lanes, max_lanes=max(self.lanes, self.max_lanes))

    def check_factory(self, form: str) -> None:
        """Refuse a factory that cannot take what ``form``'s lanes pass it, or one made for the
        other flavour (a sync ``channel_factory`` given to ``grpc_balance_mw.aio.observe``, or
        the reverse), now rather than at the move."""
        check_form(self.factory, form, "Rebalance")
        if can_call(self.factory, (), ()) is not False:
            return  # the form of ChannelFactory, or one Python cannot describe: trusted
        if form == "sync" and can_call(self.factory, ()):
            return  # the deprecated one-argument sync form: the balanced channel adapts it
        raise ConfigurationError(
            f"Rebalance: a {form} factory is called as factory(extra_options, interceptors); "
            f"see {'grpc_balance_mw' if form == 'sync' else 'grpc_balance_mw.aio'}.channel_factory"
        )


class RebalanceCore:
    """When one observed channel's calls move, and what the move opens; no I/O of its own.

    The sync and aio drivers subclass it: they say what their factory is called with, which
    balanced channel the move opens and which methods follow it, and look at :meth:`look` on
    a thread or a task (:meth:`_watch_from_now`).
    """

    #: Which channels this driver's factory makes (checked when the channel is observed).
    _FORM: ClassVar[str] = "sync"
    #: The balanced channel the calls move to, and each call kind's method that follows them.
    _BALANCED: ClassVar[type[Any]]
    _REROUTED: ClassVar[dict[str, Any]]

    def __init__(
        self,
        target: str,
        detector: AffinityDetector,
        options: ObserveOptions,
        rebalance: Rebalance,
    ) -> None:
        rebalance.check_factory(self._FORM)
        self.target = target
        self.detector = detector
        self.rebalance = rebalance
        self._options = options
        self._lock = threading.Lock()
        #: Set once closed: no move from then on (the sync watcher waits on it).
        self._stop = threading.Event()
        #: The balanced channel calls go to once moved; None until then (and once closed).
        self.balanced: Any = None
        why = self.due()
        if why is not None:
            self.activate(why)  # at once, in the caller: a bad factory is the caller's error
        else:
            self._watch_from_now()

    @property
    def _closed(self) -> bool:
        return self._stop.is_set()

    def __repr__(self) -> str:
        if self._closed:
            where = "closed"
        else:
            where = "on lanes" if self.balanced is not None else "watching"
        return f"<{type(self).__name__} {self.target} {where}>"

    def _watch_from_now(self) -> None:
        """Start looking at the detector (a thread, a task) until :meth:`look` says moved."""
        raise NotImplementedError

    def due(self) -> str | None:
        """Why the calls should move now, if they should."""
        if self.rebalance.when == "always":
            return "asked to always"
        state = self.detector.state
        return f"the affinity detector says {state.value}" if state.is_alarm else None

    def look(self) -> bool:
        """One look of the watcher: move if it is time (errors logged); True once moved."""
        why = self.due()
        if why is None:
            return False
        try:
            self.activate(why)
        except Exception:  # a watcher: nothing above it would see it; calls stay where they are
            _log.exception("grpc_balance_mw: calls to %s could not move onto lanes", self.target)
        return True

    def pool(self) -> LanePool:
        """The lanes' bookkeeping, from the settings."""
        rebalance = self.rebalance
        return pool_for_channel(
            lanes=rebalance.lanes,
            max_lanes=rebalance.max_lanes,
            follow_pods=True,
            expected_pods=self._options.expected_pods,
            pool_config=None,
            picker=rebalance.picker,
            rotation=rebalance.rotation,
        )

    def _open(self, pool: LanePool) -> Any:
        """The balanced channel (of this driver's kind) the calls move to."""
        rebalance = self.rebalance
        return self._BALANCED(
            rebalance.factory, self.target, pool=pool, observe=self._options, retry=rebalance.retry
        )

    def activate(self, why: str) -> None:
        """Open the lanes (once); later calls go to them."""
        with self._lock:
            if self.balanced is not None or self._closed:
                return
            self.balanced = self._open(self.pool())
            # Its history is the single connection's for a while: advise accordingly.
            self.detector.lanes_opened()
        _log.warning(
            "grpc_balance_mw: calls to %s move onto %d+ connections of their own (%s)",
            self.target,
            self.rebalance.lanes,
            why,
        )

    def _take(self) -> Any:
        """Closing: no move from now on; the balanced channel to close, if one was opened."""
        with self._lock:
            self._stop.set()
            balanced, self.balanced = self.balanced, None
        if balanced is not None:
            self.detector.lanes_opened(False)
        return balanced

    def rerouted(self, here: Any, spec: MethodSpec) -> Any:
        """``spec``'s method that follows the move: ``here`` (the observed channel's own
        multicallable) until the lanes open, theirs after."""
        return self._REROUTED[spec.kind](here, self, spec)


class Rerouted:
    """A method of an observed channel that follows the move: to the rebalancer's lanes once
    they are open (stubs keep the multicallable they were given, so the move happens per call).
    Each driver adds the ``grpc`` / ``grpc.aio`` multicallable base of each call kind and,
    where the kind has them, ``with_call`` and ``future``."""

    def __init__(self, here: Any, rebalancer: RebalanceCore, spec: MethodSpec) -> None:
        self._here = here
        self._rebalancer = rebalancer
        self._spec = spec
        self._moved: Any = None
        self._moved_to: Any = None

    def _route(self) -> Any:
        balanced = self._rebalancer.balanced
        if balanced is None:
            return self._here
        if self._moved_to is not balanced:
            self._moved = self._spec.make(balanced)
            self._moved_to = balanced
        return self._moved

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._route()(*args, **kwargs)
