"""One detector per target, shared by every channel and interceptor that talks to it."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator

from grpc_balance_mw.affinity import forking
from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.state import AffinitySnapshot
from grpc_balance_mw.errors import ConfigurationError


class AffinityRegistry:
    """Detectors keyed by target; the first caller's config wins for a target.

    A detector lives as long as a channel or interceptor that uses it, plus while it is among
    the ``keep_recent`` targets used last (so channels made per call still share one): the
    registry never keeps one detector per target ever seen.

    Args:
        config: the config of detectors made without one (default: ``AffinityConfig()``).
        keep_recent: how many of the targets used last keep their detector with no channel
            alive.
    """

    def __init__(self, config: AffinityConfig | None = None, *, keep_recent: int = 64) -> None:
        if keep_recent < 0:
            raise ConfigurationError("AffinityRegistry: keep_recent must be >= 0")
        self.config = config
        self.keep_recent = keep_recent
        self._lock = threading.Lock()
        self._detectors: weakref.WeakValueDictionary[str, AffinityDetector] = (
            weakref.WeakValueDictionary()
        )
        self._recent: OrderedDict[str, AffinityDetector] = OrderedDict()
        forking.track(self)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<AffinityRegistry {len(self._detectors)} targets>"

    def __iter__(self) -> Iterator[AffinityDetector]:
        with self._lock:
            return iter(list(self._detectors.values()))

    def __len__(self) -> int:
        return len(self._detectors)

    def detector(self, target: str, config: AffinityConfig | None = None) -> AffinityDetector:
        """The target's detector, made on first use (or again once it was let go)."""
        with self._lock:
            found = self._detectors.get(target)
            if found is None:
                found = self._detectors[target] = AffinityDetector(
                    target, config if config is not None else self.config
                )
            if self.keep_recent:
                recent = self._recent
                recent[target] = found
                recent.move_to_end(target)
                while len(recent) > self.keep_recent:
                    recent.popitem(last=False)
            return found

    def snapshots(self) -> dict[str, AffinitySnapshot]:
        return {detector.target: detector.snapshot() for detector in self}


#: The registry interceptors use unless given their own.
default_registry = AffinityRegistry()
