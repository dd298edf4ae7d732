"""One detector per target, shared by every channel and interceptor that talks to it."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from grpc_balance_mw.affinity.config import AffinityConfig
from grpc_balance_mw.affinity.detector import AffinityDetector
from grpc_balance_mw.affinity.state import AffinitySnapshot


class AffinityRegistry:
    """Detectors keyed by target; the first caller's config wins for a target.

    Args:
        config: the config of detectors made without one (default: ``AffinityConfig()``).
    """

    def __init__(self, config: AffinityConfig | None = None) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._detectors: dict[str, AffinityDetector] = {}

    def __repr__(self) -> str:
        return f"<AffinityRegistry {len(self._detectors)} targets>"

    def __iter__(self) -> Iterator[AffinityDetector]:
        with self._lock:
            return iter(list(self._detectors.values()))

    def __len__(self) -> int:
        return len(self._detectors)

    def detector(self, target: str, config: AffinityConfig | None = None) -> AffinityDetector:
        """The target's detector, made on first use."""
        with self._lock:
            found = self._detectors.get(target)
            if found is None:
                found = self._detectors[target] = AffinityDetector(
                    target, config if config is not None else self.config
                )
            return found

    def snapshots(self) -> dict[str, AffinitySnapshot]:
        return {detector.target: detector.snapshot() for detector in self}


#: The registry interceptors use unless given their own.
default_registry = AffinityRegistry()
