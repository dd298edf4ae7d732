"""A sliding window of which pod served each call, bounded by count and by age."""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, TypeVar

from grpc_balance_mw.affinity.counts import TopCounter

__all__ = ["L7_HEADERS", "PER_REQUEST", "PodWindow", "SampleWindow"]

#: Flags of a call in the window: it carried an L7 proxy's headers; its lane balances per request.
L7_HEADERS = 1
PER_REQUEST = 2
#: One call: (at, pod, weight, flags). A plain tuple: building it is on every call's path.
_Sample = tuple[float, str | None, int, int]
S = TypeVar("S", bound=tuple[Any, ...])


class SampleWindow(Generic[S]):
    """Samples, oldest first, each with its time first, none older than ``max_age_s``; a
    subclass keeps its totals and says in :meth:`_drop_oldest` how one leaves them.
    ``version`` changes with every total, so a verdict on the window can be cached."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._samples: deque[S] = deque()
        self.version = 0

    def __len__(self) -> int:
        return len(self._samples)

    def evict(self, now: float) -> None:
        """Forget samples older than the window."""
        horizon = now - self.max_age_s
        samples = self._samples
        while samples and samples[0][0] < horizon:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        raise NotImplementedError


class PodWindow(SampleWindow[_Sample]):
    """Calls of the last ``max_age_s`` seconds, at most ``max_calls`` of them, with running totals.

    Totals are kept incrementally, the top pod's weight included (:class:`TopCounter`), so adding
    a call costs O(1) whatever the window size and however many pods it holds. ``None`` stands
    for a call whose pod is unknown. Weights are whole units (a unary call weighs 1).

    ``version`` changes whenever a total does, and only then: a full window whose oldest call
    is like the new one (same pod, weight and flags, the steady state of a pinned channel and
    often of a balanced one) takes the new call without touching a total, and a verdict on
    the totals (the detector's) still holds.
    """

    def __init__(self, max_calls: int, max_age_s: float) -> None:
        super().__init__(max_age_s)
        self.max_calls = max_calls
        self.calls: dict[str | None, int] = {}
        self.weights: TopCounter[str] = TopCounter()
        self.l7_calls = 0
        self.per_request_calls = 0

    @property
    def samples(self) -> deque[_Sample]:
        """The calls, oldest first, as ``(at, pod, weight, flags)``. Changed only here, and by
        the detector's path for like calls, which swaps the oldest call for one like it and so
        leaves every total as it is (``AffinityDetector._take_like_calls``)."""
        return self._samples

    def add(self, pod: str | None, weight: int, flags: int, now: float) -> None:
        samples = self._samples
        if len(samples) >= self.max_calls:
            oldest = samples[0]
            if oldest[1] == pod and oldest[2] == weight and oldest[3] == flags:
                # The call that leaves is like the one that comes: every total stays.
                samples.popleft()
                samples.append((now, pod, weight, flags))
                if samples[0][0] < now - self.max_age_s:
                    self.evict(now)
                return
        self.version += 1
        samples.append((now, pod, weight, flags))
        self.calls[pod] = self.calls.get(pod, 0) + 1
        if pod is not None:
            self.weights.add(pod, weight)
        if flags:
            self.l7_calls += flags & L7_HEADERS
            self.per_request_calls += (flags & PER_REQUEST) >> 1
        if len(samples) > self.max_calls:
            self._drop_oldest()
        if samples[0][0] < now - self.max_age_s:
            self.evict(now)

    def ages_out(self, now: float) -> bool:
        """Whether the oldest call is older than the window (cheap: one comparison). Safe
        without the detector's lock: a window emptied meanwhile has nothing to age out."""
        try:
            return self._samples[0][0] < now - self.max_age_s
        except IndexError:
            return False

    def _drop_oldest(self) -> None:
        self.version += 1
        _, pod, weight, flags = self._samples.popleft()
        left = self.calls[pod] - 1
        if left:
            self.calls[pod] = left
        else:
            del self.calls[pod]
        if pod is not None:
            self.weights.remove(pod, weight)
        if flags:
            self.l7_calls -= flags & L7_HEADERS
            self.per_request_calls -= (flags & PER_REQUEST) >> 1

    @property
    def identified_calls(self) -> int:
        return len(self._samples) - self.calls.get(None, 0)

    @property
    def top_share(self) -> float:
        """The top pod's share of the identified weight, in O(1)."""
        weights = self.weights
        return weights.top / weights.total if weights.total > 0 else 0.0

    def top(self) -> tuple[str | None, float]:
        """The pod with the largest weight and its share of the identified weight."""
        return self.weights.top_key(), self.top_share

    def shares(self) -> dict[str, tuple[int, float, float]]:
        """Per identified pod: calls, weight, share of the identified weight."""
        total = self.weights.total
        return {
            pod: (self.calls[pod], float(weight), weight / total if total > 0 else 0.0)
            for pod, weight in self.weights.counts.items()
        }
